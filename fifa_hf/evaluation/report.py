"""Human-readable evaluation outputs: the markdown table and image grids."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw


def _interval(summary: dict) -> str:
    return f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"


def markdown_table(rewards: dict[str, dict]) -> str:
    """One row per reward: mean, median and 95% interval per model, and the win rate over the baseline."""
    has_baseline = any("baseline" in entry for entry in rewards.values())
    header = ["reward", "model mean", "model median", "model 95% CI"]
    if has_baseline:
        header += ["baseline mean", "baseline median", "baseline 95% CI", "win rate (model vs baseline)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in rewards.items():
        model = entry["model"]
        cells = [name, f"{model['mean']:.4f}", f"{model['median']:.4f}", _interval(model)]
        if has_baseline:
            baseline, wins = entry["baseline"], entry["win_rate"]
            cells += [
                f"{baseline['mean']:.4f}",
                f"{baseline['median']:.4f}",
                _interval(baseline),
                f"{wins['win_rate']:.3f} ({wins['wins']} W / {wins['ties']} T / {wins['losses']} L)",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    tile: int = 128,
) -> Image.Image:
    """Images in a grid of ``tile`` px cells, with column headers on top and a caption under each row."""
    columns = max(len(row) for row in rows)
    header = 16 if column_labels else 0
    caption = 28 if row_labels else 0
    grid = Image.new("RGB", (columns * tile, header + len(rows) * (tile + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((c * tile + 4, 2), label, fill="black")
    for r, row in enumerate(rows):
        top = header + r * (tile + caption)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (c * tile, top))
        if r < len(row_labels):
            text = textwrap.shorten(row_labels[r], width=max(10, columns * tile // 6), placeholder="...")
            draw.text((4, top + tile + 4), text, fill="black")
    return grid
