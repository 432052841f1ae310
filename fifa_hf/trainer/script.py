"""``fifa-hf train``: Diffusion-DPO on a preference dataset (e.g. a FiFA subset), SD1.5 or SDXL, LoRA or full.

    fifa-hf train --config examples/sd15_lora.yaml
    accelerate launch -m fifa_hf.trainer.script --config examples/sd15_full.yaml
    fifa-hf train --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name <user>/pickapic-fifa --output_dir sd15-fifa-dpo --use_peft true

Every `ScriptArguments`, `DiffusionDPOConfig` and `ModelConfig` field is a flag or a YAML key. Flags that do not
apply to a diffusion UNet are refused with the reason, never ignored. The model and the dataset are resolved
before anything long starts.
"""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig
from trl import ModelConfig, ScriptArguments, TrlParser

from fifa_hf.data import detect_schema, load_preference_dataset, parquet_files
from fifa_hf.host_memory import retain_freed_memory
from fifa_hf.pipelines import load_pipeline
from fifa_hf.progress import setup_logging
from fifa_hf.resolve import DIFFUSERS_PIPELINE_FILES, ResolutionError, resolve_hub_reference
from fifa_hf.trainer.config import DiffusionDPOConfig
from fifa_hf.trainer.model_card import hub_id
from fifa_hf.trainer.trainer import DiffusionDPOTrainer

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PAPER_EFFECTIVE_BATCH = 2048
MODEL_CONFIG_DEFAULTS = ModelConfig()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def refused_flags(script_args: ScriptArguments, model_args: ModelConfig) -> list[str]:
    """The flags given a value this command cannot honour, each with the reason."""
    refused = []
    if script_args.dataset_streaming:
        refused.append(
            "--dataset_streaming: Diffusion-DPO trains on a map-style dataset (it shuffles and resumes by index); "
            "load the subset in full (a FiFA subset is small)."
        )
    if script_args.ignore_bias_buffers:
        refused.append("--ignore_bias_buffers: for transformers models with boolean buffers; a UNet has none.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        refused.append("--load_in_4bit / --load_in_8bit: quantized UNet training is not supported.")
    if model_args.attn_implementation is not None:
        refused.append("--attn_implementation: a transformers option; diffusers' UNet picks its attention itself.")
    if model_args.lora_target_parameters:
        refused.append("--lora_target_parameters: LoRA on raw parameters cannot be saved for load_lora_weights.")
    if model_args.lora_modules_to_save:
        refused.append(
            "--lora_modules_to_save: diffusers' load_lora_weights cannot load fully trained modules with a LoRA; "
            "train the full UNet instead (--use_peft false)."
        )
    if model_args.lora_task_type != MODEL_CONFIG_DEFAULTS.lora_task_type:
        refused.append("--lora_task_type: a task type of transformers models; a UNet LoRA has none.")
    if model_args.dtype not in DTYPES:
        refused.append(f"--dtype {model_args.dtype!r}: diffusers pipelines load in one of {', '.join(DTYPES)}.")
    if not model_args.use_peft:
        lora_flags = ("lora_r", "lora_alpha", "lora_target_modules", "use_rslora", "use_dora")
        given = [
            f"--{name}" for name in lora_flags if getattr(model_args, name) != getattr(MODEL_CONFIG_DEFAULTS, name)
        ]
        if given:
            refused.append(f"{', '.join(given)}: LoRA options, but --use_peft is false (a full fine-tune).")
    return refused


def lora_config(model_args: ModelConfig) -> LoraConfig:
    """TRL's LoRA flags on the UNet's attention projections; the config is saved with the weights, so
    ``load_lora_weights`` applies the trained scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)."""
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or UNET_LORA_TARGETS,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        init_lora_weights="gaussian",
    )


def warn_if_small_batch(args: DiffusionDPOConfig) -> int:
    """The paper trains with an effective batch of 2048; much smaller batches change the dynamics."""
    effective = args.effective_batch_size
    if effective * 8 < PAPER_EFFECTIVE_BATCH:
        logger.warning(
            "Effective batch size %d is far below the paper's %d (raise gradient_accumulation_steps); "
            "the paper scales the learning rate as 1e-8 x effective batch.", effective, PAPER_EFFECTIVE_BATCH,
        )  # fmt: skip
    return effective


def _load_split(script_args: ScriptArguments, reference: str, split: str, flag: str):
    kwargs = {"name": script_args.dataset_config} if script_args.dataset_config else {}
    try:
        return load_preference_dataset(reference, split=split, **kwargs)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{flag} {split!r}: {reference!r} has no such split ({error}).") from error


def uninstalled_reporters(report_to: list[str]) -> list[str]:
    """``--report_to`` integrations whose package is missing (transformers fails on them only when the trainer is
    built, after the model download and the dataset), each with the fix."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    return [
        f"--report_to {name}: not installed (`pip install {name}`, or --report_to none)."
        for name in report_to
        if name not in ("all", "none") and name not in available
    ]


def train(script_args: ScriptArguments, training_args: DiffusionDPOConfig, model_args: ModelConfig):
    """Check the flags, resolve the model and dataset, train, then save (and push) the result."""
    setup_logging()  # fifa-hf's messages at INFO, other libraries' at WARNING
    refused = refused_flags(script_args, model_args) + uninstalled_reporters(training_args.report_to or [])
    if refused:
        raise ValueError("Unsupported flag(s):\n  " + "\n  ".join(refused))
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required: a Hub dataset id or a local dataset directory.")
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub pipeline id or a local pipeline directory.")
    model_is_hub = hub_id(model_args.model_name_or_path) is not None
    if model_args.model_revision != MODEL_CONFIG_DEFAULTS.model_revision and not model_is_hub:
        raise ValueError(f"--model_revision applies to Hub models; {model_args.model_name_or_path!r} is local.")
    dataset = resolve_hub_reference(script_args.dataset_name, "--dataset_name", repo_type="dataset", download=False)
    if script_args.dataset_config and hub_id(dataset) is None:
        raise ResolutionError(
            f"--dataset_config {script_args.dataset_config!r} selects a configuration of a Hub dataset; "
            f"{script_args.dataset_name!r} is a local dataset."
        )
    train_dataset = _load_split(script_args, dataset, script_args.dataset_train_split, "--dataset_train_split")
    try:
        detect_schema(train_dataset.column_names)
    except ValueError as error:  # before the model download, naming the flag
        raise ValueError(f"--dataset_name {script_args.dataset_name!r}: {error}") from error
    eval_dataset = None
    if training_args.eval_strategy != "no":
        # A single-split source gives the same rows whatever split is asked for: parquet files before loading them
        # again, a saved Dataset by its fingerprint.
        single_split = parquet_files(dataset) is not None
        if not single_split:
            eval_dataset = _load_split(script_args, dataset, script_args.dataset_test_split, "--dataset_test_split")
            single_split = eval_dataset._fingerprint == train_dataset._fingerprint
        if single_split:
            raise ValueError(
                f"--dataset_test_split {script_args.dataset_test_split!r}: {script_args.dataset_name!r} holds a single "
                "split, so evaluation would run on the training pairs; save train and test splits (a DatasetDict)."
            )
    model_path = resolve_hub_reference(
        model_args.model_name_or_path,
        "--model_name_or_path",
        revision=model_args.model_revision if model_is_hub else None,
        allow_patterns=DIFFUSERS_PIPELINE_FILES,
    )
    if training_args.device.type == "cpu" and retain_freed_memory():
        logger.info("Training on CPU: freed host memory is kept for reuse (glibc's mmap and trim thresholds raised).")
    pipeline = load_pipeline(model_path, torch_dtype=DTYPES[model_args.dtype])
    warn_if_small_batch(training_args)
    trainer = DiffusionDPOTrainer(
        pipeline,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
    )
    trainer.base_model = model_args.model_name_or_path
    trainer.dataset_names = [script_args.dataset_name]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    else:
        trainer.save_model(training_args.output_dir)
    trainer.accelerator.end_training()  # with several processes, their group ends here, not in a teardown race
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, DiffusionDPOConfig, ModelConfig), prog="fifa-hf train", description=__doc__)


def main(argv: list[str] | None = None):
    return train(*make_parser().parse_args_and_config(argv))


if __name__ == "__main__":
    main()
