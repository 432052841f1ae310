"""Diffusion-DPO training: config, trainer, loss and collators."""

from fifa_hf.pipelines import load_pipeline
from fifa_hf.trainer.config import DiffusionDPOConfig
from fifa_hf.trainer.loss import diffusion_dpo_loss, per_sample_mse
from fifa_hf.trainer.trainer import DiffusionDPOTrainer

__all__ = ["DiffusionDPOConfig", "DiffusionDPOTrainer", "diffusion_dpo_loss", "load_pipeline", "per_sample_mse"]
