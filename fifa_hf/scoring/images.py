"""CLIP preprocessing for reward models, batched; decoding lives in ``fifa_hf.images`` (shared with the trainer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fifa_hf.images import decode_image

__all__ = ["CLIPImageTransform", "decode_image"]


@dataclass(frozen=True)
class CLIPImageTransform:
    """CLIP's eval transform (resize the shortest side, center crop, rescale, normalize), batched.

    Resizing and cropping run in PIL on uint8 images; rescaling and normalization run once on the
    stacked batch in torch. The output equals transformers' ``CLIPImageProcessor`` (``round_offset=False``)
    or open_clip's torchvision transform (``round_offset=True``) at a fraction of their per-image cost.
    """

    size: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = Image.BICUBIC
    round_offset: bool = False

    @classmethod
    def from_image_processor(cls, processor: Any) -> CLIPImageTransform | None:
        """The transform a transformers CLIP image processor applies, or None when it does something else."""
        size, crop = dict(processor.size or {}), dict(processor.crop_size or {})
        standard = (
            processor.do_resize
            and processor.do_center_crop
            and processor.do_rescale
            and processor.do_normalize
            and abs(processor.rescale_factor - 1 / 255) < 1e-9
            and set(size) == {"shortest_edge"}
            and crop.get("height") == crop.get("width")
        )
        if not standard:
            return None
        return cls(
            size=int(size["shortest_edge"]),
            crop=int(crop["height"]),
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            resample=int(processor.resample if processor.resample is not None else Image.BICUBIC),
        )

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = []
        for image in images:
            width, height = image.size
            if width <= height:
                resized = (self.size, int(self.size * height / width))
            else:
                resized = (int(self.size * width / height), self.size)
            if resized != image.size:
                image = image.resize(resized, self.resample)
            if image.size != (self.crop, self.crop):
                dx, dy = image.width - self.crop, image.height - self.crop
                left, top = (int(round(dx / 2.0)), int(round(dy / 2.0))) if self.round_offset else (dx // 2, dy // 2)
                image = image.crop((left, top, left + self.crop, top + self.crop))
            arrays.append(np.asarray(image if image.mode == "RGB" else image.convert("RGB")))
        # (x / 255 - mean) / std as one multiply-add per channel, on the uint8 batch viewed as NCHW.
        scale = 1.0 / (255.0 * torch.tensor(self.std, dtype=torch.float32))
        shift = -torch.tensor(self.mean, dtype=torch.float32) / torch.tensor(self.std, dtype=torch.float32)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return pixels.mul_(scale[:, None, None]).add_(shift[:, None, None])
