"""Diffusion-DPO on a preference dataset (e.g. a FiFA subset), SD1.5 or SDXL, LoRA or full.

    accelerate launch examples/train.py --config examples/sd15_lora.yaml
    accelerate launch examples/train.py \
        --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name <user>/pickapic-fifa --output_dir sd15-fifa-dpo --use_peft true

Any DiffusionDPOConfig, ScriptArguments or ModelConfig field is a flag or a YAML key.
"""

from __future__ import annotations

import logging

from peft import LoraConfig
from trl import ModelConfig, ScriptArguments, TrlParser

from fifa_hf.data import load_preference_dataset
from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PAPER_EFFECTIVE_BATCH = 2048


def warn_if_small_batch(args: DiffusionDPOConfig) -> int:
    """The paper trains with an effective batch of 2048; much smaller batches change the dynamics."""
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    if effective * 8 < PAPER_EFFECTIVE_BATCH:
        logger.warning(
            "Effective batch size %d is far below the paper's %d (raise gradient_accumulation_steps); "
            "the paper scales the learning rate as 1e-8 x effective batch.", effective, PAPER_EFFECTIVE_BATCH,
        )  # fmt: skip
    return effective


def main(
    script_args: ScriptArguments, training_args: DiffusionDPOConfig, model_args: ModelConfig
) -> DiffusionDPOTrainer:
    logging.basicConfig(level=logging.INFO)
    train = load_preference_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
    peft_config = None
    if model_args.use_peft:
        peft_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or UNET_LORA_TARGETS,
            init_lora_weights="gaussian",
        )
    warn_if_small_batch(training_args)
    trainer = DiffusionDPOTrainer(
        model_args.model_name_or_path, args=training_args, train_dataset=train, peft_config=peft_config
    )
    trainer.dataset_names = [script_args.dataset_name]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DiffusionDPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
