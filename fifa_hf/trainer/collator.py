"""Collators for Diffusion-DPO: decode each pair and augment both images identically."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def crop_pair(
    chosen: Image.Image, rejected: Image.Image, resolution: int, random_crop: bool, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution``, then one crop and one flip for both images.

    Returns both tensors, the chosen image's original (height, width) and the crop's (top, left),
    which SDXL's micro-conditioning needs.
    """
    original_size = (chosen.height, chosen.width)
    scale = resolution / min(chosen.size)
    size = (max(resolution, round(chosen.width * scale)), max(resolution, round(chosen.height * scale)))
    chosen, rejected = chosen.resize(size, Image.BILINEAR), rejected.resize(size, Image.BILINEAR)
    if random_crop:
        top = int(torch.randint(0, size[1] - resolution + 1, ()).item())
        left = int(torch.randint(0, size[0] - resolution + 1, ()).item())
    else:
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    chosen, rejected = chosen.crop(box), rejected.crop(box)
    if flip:
        chosen, rejected = chosen.transpose(Image.FLIP_LEFT_RIGHT), rejected.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(chosen), _to_tensor(rejected), original_size, (top, left)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class DiffusionDPOCollator:
    """Canonical pairs (``prompt``, ``chosen``, ``rejected`` bytes) -> pixel batches and caption dropout.

    Random choices (crop, flip, dropped prompt) draw from torch's global RNG, which the Trainer
    checkpoints, so a resumed run sees the same augmentations.
    """

    def __init__(
        self, resolution: int, random_crop: bool = False, hflip: bool = True, proportion_empty_prompts: float = 0.0
    ):
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, original_sizes, crops, prompts = [], [], [], [], []
        for example in examples:
            flip = self.hflip and bool(torch.rand(()) < 0.5)
            winner, loser, size, crop = crop_pair(
                decode(example["chosen"]), decode(example["rejected"]), self.resolution, self.random_crop, flip
            )
            chosen.append(winner)
            rejected.append(loser)
            original_sizes.append(size)
            crops.append(crop)
            drop = bool(torch.rand(()) < self.proportion_empty_prompts)
            prompts.append("" if drop else example["prompt"])
        return {
            "chosen_pixel_values": torch.stack(chosen),
            "rejected_pixel_values": torch.stack(rejected),
            "prompts": prompts,
            "original_sizes": torch.tensor(original_sizes),
            "crop_top_lefts": torch.tensor(crops),
        }


class CachedPairCollator:
    """With ``cache_latents``: only the pair index, the flip and the caption dropout are drawn per step."""

    def __init__(self, hflip: bool = True, proportion_empty_prompts: float = 0.0):
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(examples)
        flips = (torch.rand(n) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        return {
            "pair_index": torch.tensor([example["pair_index"] for example in examples]),
            "flip": flips,
            "drop_prompt": torch.rand(n) < self.proportion_empty_prompts,
        }
