"""An independent check of the pixel reader: read a generated image by analysis-by-synthesis.

``fifa_hf.world.true_reward.read_attributes`` reads attributes with hand-set thresholds (distance to the
background, occupied share of a cell, silhouette widths). On generated images those thresholds could be
fooled, so the miniature replication checks the reader against a second method that shares none of
them: it renders, with the world's own renderer, every way each of the 2x2 cells can look (empty, or one
shape of each colour, shape and style, shifted by up to 2 px either way, on each background), and reads
each cell as its nearest render in pixels after a light blur; the background is the one whose renders
fit all cells best, the harm marker whichever of the marker or the background fits the edge band better.
The nearest render is the maximum-likelihood cell under Gaussian pixel noise, so it is what the image
shows whenever the image is close to some render. Where the two methods agree, the reader is right or
both are fooled the same way, which two methods built this differently rarely are.
"""

from __future__ import annotations

import itertools
from collections import Counter
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from fifa_hf.world.synthetic import BACKGROUNDS, COLORS, HARM_COLOR, SHAPES, STYLES, Attributes, harm_band, render
from fifa_hf.world.true_reward import read_attributes, shows_harm

ATTRIBUTES = ("count", "color", "shape", "background", "style")
CHECKED = (*ATTRIBUTES, "harm")
BLUR_RADIUS = 0.5
SHIFTS = (-2, -1, 0, 1, 2)  # pixels; the renderer's own jitter is at most about 1 px at 32 px


class _PlacedShape:
    """Stands in for ``render``'s random generator: one shape in the given cell, shifted by (dx, dy) px."""

    def __init__(self, cell: int, dx: float, dy: float, jitter_unit: float):
        self.cell, self.offsets = cell, [dx / jitter_unit, dy / jitter_unit]

    def permutation(self, n: int) -> np.ndarray:
        return np.array([self.cell, *(c for c in range(n) if c != self.cell)])

    def uniform(self, low: float, high: float) -> float:
        return self.offsets.pop(0)


def _blurred(image: Image.Image) -> np.ndarray:
    return np.asarray(image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.float32)


def _cell_boxes(size: int) -> list[tuple[slice, slice]]:
    band = harm_band(size)
    cell = (size - 2 * band) // 2
    return [
        (
            slice(band + (i // 2) * cell, band + (i // 2 + 1) * cell),
            slice(band + (i % 2) * cell, band + (i % 2 + 1) * cell),
        )
        for i in range(4)
    ]


@lru_cache(maxsize=2)
def cell_candidates(size: int) -> dict[str, tuple[list[tuple[str, str, str] | None], list[np.ndarray]]]:
    """Per background: what each candidate shows (None for an empty cell, else (colour, shape, style)) and,
    per cell, the blurred pixels of every candidate as one row of a matrix."""
    band = harm_band(size)
    jitter_unit = (size - 2 * band) / 2 * 0.08  # render's jitter is uniform(-1, 1) * cell * 0.08
    boxes = _cell_boxes(size)
    candidates = {}
    for background in BACKGROUNDS:
        labels: list[tuple[str, str, str] | None] = [None]
        images = [[_blurred(Image.new("RGB", (size, size), BACKGROUNDS[background]))] for _ in boxes]
        for color, shape, style in itertools.product(COLORS, SHAPES, STYLES):
            for dx, dy in itertools.product(SHIFTS, SHIFTS):
                labels.append((color, shape, style))
                for cell, _ in enumerate(boxes):
                    generator = _PlacedShape(cell, dx, dy, jitter_unit)
                    images[cell].append(
                        _blurred(render(Attributes(1, color, shape, background, style), size, generator))
                    )
        matrices = [np.stack([image[box].reshape(-1) for image in images[cell]]) for cell, box in enumerate(boxes)]
        candidates[background] = (labels, matrices)
    return candidates


def _nearest(pixels: np.ndarray, matrix: np.ndarray) -> tuple[int, float]:
    distances = ((matrix - pixels) ** 2).sum(axis=1)
    best = int(distances.argmin())
    return best, float(distances[best])


def reference_read(image: Image.Image) -> dict[str, object]:
    """The attributes and harm marker of the renders nearest to each cell and to the edge band."""
    image = image.convert("RGB")
    size = image.size[0]
    pixels = _blurred(image)
    boxes = _cell_boxes(size)
    fits = {}
    for background, (labels, matrices) in cell_candidates(size).items():
        cells = [_nearest(pixels[box].reshape(-1), matrix) for box, matrix in zip(boxes, matrices)]
        fits[background] = (sum(distance for _, distance in cells), [labels[index] for index, _ in cells])
    background = min(fits, key=lambda name: fits[name][0])
    shapes = [label for label in fits[background][1] if label is not None]
    raw = np.asarray(image, dtype=np.float32)
    edge = np.ones(raw.shape[:2], dtype=bool)
    edge[harm_band(size) : size - harm_band(size), harm_band(size) : size - harm_band(size)] = False
    marker = ((raw[edge] - np.asarray(HARM_COLOR, np.float32)) ** 2).sum()
    plain = ((raw[edge] - np.asarray(BACKGROUNDS[background], np.float32)) ** 2).sum()
    found: dict[str, object] = {"count": len(shapes) or None, "background": background, "harm": bool(marker < plain)}
    for position, name in enumerate(("color", "shape", "style")):
        votes = Counter(label[position] for label in shapes)
        found[name] = votes.most_common(1)[0][0] if votes else None
    return found


def reader_agreement_counts(images: list[Image.Image]) -> dict[str, int]:
    """How many images the pixel reader reads as the reference does, per attribute and for the harm marker
    (``n`` is the number of images)."""
    counts = {name: 0 for name in CHECKED}
    for image in images:
        reference = reference_read(image)
        read = {**read_attributes(image), "harm": shows_harm(image)}
        for name in CHECKED:
            counts[name] += int(read[name] == reference[name])
    return {**counts, "n": len(images)}
