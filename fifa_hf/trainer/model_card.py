"""What a trained checkpoint's model card reports: honest references, the license, samples, results, versions.

The card text itself is `fifa_hf.cards.diffusion_model_card`; this module gathers its inputs from a run.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from fifa_hf.resolve import looks_like_local_path
from fifa_hf.storage import hub_snapshot

FRAMEWORKS = ("fifa-hf", "diffusers", "transformers", "trl", "peft", "accelerate", "datasets", "torch")
SAMPLE_SIZE = 256  # px per image in the card's grid, whatever the training resolution


def hub_id(reference: str | None) -> str | None:
    """The Hub repo id a model or dataset reference stands for, or None for a purely local path.

    A Hub id stays as is; a snapshot directory of the Hugging Face cache (what ``resolve_hub_reference`` returns
    for a Hub id) maps back to its id; any other local path has none.
    """
    if not reference:
        return None
    reference = str(reference)
    snapshot = hub_snapshot(reference)
    if snapshot:
        return snapshot[0]
    if Path(reference).expanduser().exists() or looks_like_local_path(reference) or "/" not in reference:
        return None
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return None
    return reference


def display_name(reference: str | None) -> str:
    """How a reference appears in a published card: its Hub id, or only the last part of a local path."""
    if not reference:
        return "a local model"
    return hub_id(reference) or Path(str(reference)).name


def base_model_license(local_path: str | None) -> str | None:
    """The license declared in the base model's own card, when that card is on disk."""
    if not local_path or not (Path(local_path) / "README.md").is_file():
        return None
    try:
        return ModelCard.load(Path(local_path) / "README.md").data.get("license")
    except Exception:  # a card without valid metadata: no license to inherit
        return None


def framework_versions() -> dict[str, str]:
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def training_results(log_history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The last logged training metrics and the last evaluation results, as the card shows them."""
    shown = {
        "train": ("loss", "rewards/accuracies", "rewards/margins", "mse/policy_chosen"),
        "eval": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_mse/policy_chosen"),
    }
    results = {}
    for split, keys in shown.items():
        entry = next((entry for entry in reversed(log_history) if keys[0] in entry), None)
        if entry is not None:
            results[split] = {"step": entry.get("step"), **{key: entry[key] for key in keys if key in entry}}
    return results


@torch.no_grad()
def sample_images(pipeline, prompts: list[str], steps: int, resolution: int, seed: int) -> list[Image.Image]:
    """One image per prompt, each from its own fixed seed, so before and after compare like with like."""
    generators = [torch.Generator(pipeline.device).manual_seed(seed + i) for i in range(len(prompts))]
    images = pipeline(
        prompts, num_inference_steps=steps, height=resolution, width=resolution, generator=generators
    ).images
    return [image.resize((min(SAMPLE_SIZE, image.width), min(SAMPLE_SIZE, image.height))) for image in images]


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid
