"""Diffusion-DPO on a preference dataset: a thin caller of `fifa-hf train` (fifa_hf/trainer/script.py).

    accelerate launch examples/train.py --config examples/sd15_lora.yaml
    accelerate launch examples/train.py \
        --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name <user>/pickapic-fifa --output_dir sd15-fifa-dpo --use_peft true

Any DiffusionDPOConfig, ScriptArguments or ModelConfig field is a flag or a YAML key (`fifa-hf train --help`).
"""

from fifa_hf.trainer.script import main

if __name__ == "__main__":
    main()
