"""The synthetic world's true reward for any image: its attributes read back from pixels.

``read_attributes`` inverts ``fifa_hf.synthetic.render``: the background from the border, the colour
from the pixels that are not background, the count from which cells of the 2x2 grid hold a shape,
and the shape and style from each shape's silhouette. A generated image is judged against the prompt
it was asked for, so samples are scored against the truth, not against a proxy reward model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fifa_hf.scoring.rewards import RewardModel
from fifa_hf.synthetic import BACKGROUNDS, COLORS, Attributes, parse_prompt

FOREGROUND_DISTANCE = 70.0  # RGB distance from the background colour beyond which a pixel is "shape"
OCCUPIED_FRACTION = 0.06  # share of a cell's pixels that must be shape for the cell to count


def _nearest(color: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float32) - color, axis=1)
    return names[int(distances.argmin())]


def _silhouette(mask: np.ndarray) -> tuple[str, str] | None:
    """(shape, style) of one cell's shape mask, from the widths of its top and bottom rows and its centre."""
    rows, columns = np.nonzero(mask)
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
    box = mask[top : bottom + 1, left : right + 1]
    height, width = box.shape
    if height < 3 or width < 3:
        return None
    band = max(1, round(height * 0.15))
    top_width = box[:band].sum(axis=1).max() / width
    bottom_width = box[-band:].sum(axis=1).max() / width
    if top_width > 0.8 and bottom_width > 0.8:
        shape = "square"
    elif bottom_width > 0.8 and top_width < 0.6:
        shape = "triangle"
    else:
        shape = "circle"
    # The centre third of the box: mostly shape when filled, mostly background when outlined (a
    # triangle's centre of mass sits lower, so its window is shifted down).
    shift = height // 6 if shape == "triangle" else 0
    y0, x0 = height // 3 + shift, width // 3
    centre = box[y0 : max(y0 + 1, height - height // 3 + shift), x0 : max(x0 + 1, width - width // 3)]
    style = "filled" if centre.mean() > 0.5 else "outlined"
    return shape, style


def read_attributes(image: Image.Image) -> dict[str, object]:
    """The attributes an image shows (a value is None when it cannot be read, e.g. no shape drawn)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = min(pixels.shape[:2])
    pixels = pixels[:size, :size]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    mask = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], np.float32), axis=2) > FOREGROUND_DISTANCE
    found: dict[str, object] = {"background": background, "count": None, "color": None, "shape": None, "style": None}
    if not mask.any():
        return found
    found["color"] = _nearest(np.median(pixels[mask], axis=0), COLORS)
    cell = size // 2
    cells = [mask[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] for r in range(2) for c in range(2)]
    occupied = [m for m in cells if m.mean() > OCCUPIED_FRACTION]
    found["count"] = len(occupied) or None
    silhouettes = [s for s in (_silhouette(m) for m in occupied) if s is not None]
    if silhouettes:
        found["shape"] = Counter(s for s, _ in silhouettes).most_common(1)[0][0]
        found["style"] = Counter(s for _, s in silhouettes).most_common(1)[0][0]
    return found


def true_reward(prompt: str | Attributes, image: Image.Image) -> float:
    """Fraction of the prompt's attributes the image shows; NaN for a prompt outside the grammar."""
    target = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if target is None:
        return float("nan")
    shown = read_attributes(image)
    return sum(shown[name] == getattr(target, name) for name in shown) / len(shown)


class SyntheticTrueReward(RewardModel):
    """``true_reward`` behind the reward-model interface, so evaluation code scores against the truth."""

    name = "true_reward"

    def __init__(self):
        super().__init__(device="cpu")

    def _load(self):
        return None

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> np.ndarray:
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
        return np.array([true_reward(p, i) for p, i in zip(prompts, images)], dtype=np.float64)
