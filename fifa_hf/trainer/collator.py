"""Collators for Diffusion-DPO: decode each pair and augment both images identically."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from fifa_hf.images import decode_image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def pair_generator(seed: int, epoch: int, pair_index: int) -> torch.Generator:
    """The random stream of one pair in one epoch: augmentations are a pure function of these three,
    so prefetching dataloaders and resumed runs see exactly the same ones."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + pair_index) % 2**63)


def crop_pair(
    chosen: Image.Image,
    rejected: Image.Image,
    resolution: int,
    random_crop: bool,
    flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize each image's shorter side to ``resolution``, then one crop and one flip for both images.

    The crop sits at the same place in both; an image of another aspect ratio than the chosen one (never
    squashed to its size) is cropped at the same relative place. Returns both tensors, the chosen image's
    original (height, width) and the crop's (top, left), which SDXL's micro-conditioning needs.
    """
    original_size = (chosen.height, chosen.width)
    chosen, rejected = _shorter_side_to(chosen, resolution), _shorter_side_to(rejected, resolution)
    slack_height, slack_width = chosen.height - resolution, chosen.width - resolution
    if random_crop:
        top = int(torch.randint(0, slack_height + 1, (), generator=generator).item())
        left = int(torch.randint(0, slack_width + 1, (), generator=generator).item())
    else:
        top, left = slack_height // 2, slack_width // 2
    chosen = chosen.crop((left, top, left + resolution, top + resolution))
    rejected_top = _same_place(top, slack_height, rejected.height - resolution)
    rejected_left = _same_place(left, slack_width, rejected.width - resolution)
    rejected = rejected.crop((rejected_left, rejected_top, rejected_left + resolution, rejected_top + resolution))
    if flip:
        chosen, rejected = chosen.transpose(Image.FLIP_LEFT_RIGHT), rejected.transpose(Image.FLIP_LEFT_RIGHT)
        left = slack_width - left  # where the crop sits in the flipped image
    return _to_tensor(chosen), _to_tensor(rejected), original_size, (top, left)


def _shorter_side_to(image: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR)


def _same_place(offset: int, slack: int, other_slack: int) -> int:
    """The offset in an image with ``other_slack`` pixels to spare at the relative place ``offset`` has in one with
    ``slack`` (the centre when that one has none)."""
    if other_slack == slack:
        return offset
    return round(offset / slack * other_slack) if slack else other_slack // 2


class SharedEpoch:
    """The current epoch, in shared memory: dataloader workers (persistent ones too) read the value the
    trainer sets in the main process, so every epoch draws new augmentations."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._value.fill_(value)


class DiffusionDPOCollator(SharedEpoch):
    """Canonical pairs (``prompt``, ``chosen``, ``rejected`` bytes, ``pair_index``) -> pixel batches.

    Each pair gets one crop and one flip for both images, and caption dropout; the choices come from
    ``pair_generator(seed, epoch, pair_index)`` (the trainer sets ``epoch``). With ``random_crop=False``,
    ``hflip=False`` and ``proportion_empty_prompts=0`` it is deterministic (the evaluation collator).
    """

    def __init__(
        self,
        resolution: int,
        random_crop: bool = False,
        hflip: bool = True,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
    ):
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        super().__init__()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, original_sizes, crops, prompts = [], [], [], [], []
        epoch = self.epoch
        for example in examples:
            generator = pair_generator(self.seed, epoch, example["pair_index"])
            flip = self.hflip and bool(torch.rand((), generator=generator) < 0.5)
            drop = bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)
            winner, loser, size, crop = crop_pair(
                decode_image(example["chosen"]),
                decode_image(example["rejected"]),
                self.resolution,
                self.random_crop,
                flip,
                generator,
            )
            chosen.append(winner)
            rejected.append(loser)
            original_sizes.append(size)
            crops.append(crop)
            prompts.append("" if drop else example["prompt"])
        return {
            "chosen_pixel_values": torch.stack(chosen),
            "rejected_pixel_values": torch.stack(rejected),
            "prompts": prompts,
            "original_sizes": torch.tensor(original_sizes),
            "crop_top_lefts": torch.tensor(crops),
        }


class CachedPairCollator(SharedEpoch):
    """With ``cache_latents``: only the pair index, the flip and the caption dropout are drawn per step."""

    def __init__(self, hflip: bool = True, proportion_empty_prompts: float = 0.0, seed: int = 0):
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        super().__init__()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        flips, drops = [], []
        epoch = self.epoch
        for example in examples:
            generator = pair_generator(self.seed, epoch, example["pair_index"])
            flips.append(self.hflip and bool(torch.rand((), generator=generator) < 0.5))
            drops.append(bool(torch.rand((), generator=generator) < self.proportion_empty_prompts))
        return {
            "pair_index": torch.tensor([example["pair_index"] for example in examples]),
            "flip": torch.tensor(flips),
            "drop_prompt": torch.tensor(drops),
        }
