"""Loading the Stable Diffusion (1.x/2.x) and SDXL pipelines that training and evaluation start from."""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import deprecation_utils

from fifa_hf.resolve import DIFFUSERS_PIPELINE_FILES, resolve_hub_reference

# Recent diffusers renamed from_pretrained's torch_dtype to dtype and warn on the old name.
_DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(
    model: str | os.PathLike | DiffusionPipeline, torch_dtype: torch.dtype | None = None, revision: str | None = None
) -> DiffusionPipeline:
    """A Hub id, a local pipeline directory or a pipeline object; SD pipelines load without a safety checker.

    A Hub id is resolved (downloaded, or found in the cache) before anything loads, failing at once if it cannot be.
    """
    if isinstance(model, DiffusionPipeline):
        return model
    path = resolve_hub_reference(model, "model", revision=revision, allow_patterns=DIFFUSERS_PIPELINE_FILES)
    kwargs = {}
    if torch_dtype not in (None, torch.float32):
        kwargs[_DTYPE_KWARG] = torch_dtype
    if "text_encoder_2" in DiffusionPipeline.load_config(path):
        return StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False, **kwargs)
