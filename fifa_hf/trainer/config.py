"""Configuration of the Diffusion-DPO trainer, in TRL's style."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from fifa_hf.trainer.loss import LOSS_TYPES


@dataclass
class DiffusionDPOConfig(TrainingArguments):
    r"""
    Configuration class for the [`DiffusionDPOTrainer`].

    Parameters that control the model:
        save_full_pipeline (`bool`, *optional*, defaults to `False`):
            For full fine-tuning, also save the whole pipeline (with the trained UNet) in `output_dir`.

    Parameters that control the data:
        resolution (`int` or `None`, *optional*, defaults to `None`):
            Training resolution in pixels; `None` uses the UNet's native size (512 for SD1.5, 1024 for SDXL).
        random_crop (`bool`, *optional*, defaults to `False`):
            Crop randomly instead of centrally (the same crop for both images of a pair).
        no_hflip (`bool`, *optional*, defaults to `False`):
            Disable random horizontal flips (the same flip for both images of a pair).
        proportion_empty_prompts (`float`, *optional*, defaults to `0.0`):
            Fraction of prompts replaced by the empty prompt (caption dropout, for classifier-free guidance).
        cache_latents (`bool`, *optional*, defaults to `False`):
            Encode every image with the VAE and every prompt with the text encoders once, before training.
        drop_ties (`bool`, *optional*, defaults to `True`):
            Drop pairs labelled as ties.
        dataset_num_proc (`int` or `None`, *optional*, defaults to `None`):
            Processes used to prepare the dataset.

    Parameters that control the training:
        beta (`float`, *optional*, defaults to `5000.0`):
            KL regularization strength, in the Diffusion-DPO paper's convention
            (`inside = -0.5 * beta * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))`).
        loss_type (`str`, *optional*, defaults to `"sigmoid"`):
            `"sigmoid"` (Diffusion-DPO), `"hinge"` or `"ipo"`.
        sft (`bool`, *optional*, defaults to `False`):
            Train on the chosen images only with the plain denoising loss (the SFT baseline).

    Defaults that differ from [`~transformers.TrainingArguments`]: `learning_rate=1e-5`,
    `logging_steps=10`, `remove_unused_columns=False` (the image columns must reach the collator),
    `bf16=False` and `fp16=False` (mixed precision is opt-in, never on CPU).
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep all columns: the image columns must reach the collator."}
    )
    bf16: bool = field(default=False, metadata={"help": "Use bf16 mixed precision (GPU only)."})

    beta: float = field(default=5000.0, metadata={"help": "KL strength, in the Diffusion-DPO paper's convention."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"Loss: {', '.join(LOSS_TYPES)}."})
    sft: bool = field(default=False, metadata={"help": "Train on the chosen images only (SFT baseline)."})
    resolution: int | None = field(
        default=None, metadata={"help": "Training resolution; default: the UNet's native size."}
    )
    random_crop: bool = field(default=False, metadata={"help": "Random instead of center crops."})
    no_hflip: bool = field(default=False, metadata={"help": "Disable random horizontal flips."})
    proportion_empty_prompts: float = field(
        default=0.0, metadata={"help": "Fraction of prompts replaced by the empty prompt."}
    )
    cache_latents: bool = field(
        default=False, metadata={"help": "Encode images and prompts once before training and reuse them."}
    )
    drop_ties: bool = field(default=True, metadata={"help": "Drop pairs labelled as ties."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes to prepare the dataset."})
    save_full_pipeline: bool = field(
        default=False, metadata={"help": "Full fine-tuning: also save the whole pipeline in output_dir."}
    )

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}")
        if self.cache_latents and self.random_crop:
            raise ValueError(
                "cache_latents encodes each image once, so a random crop could not change between epochs; "
                "use center crops (random_crop=False) with cache_latents."
            )
        super().__post_init__()
