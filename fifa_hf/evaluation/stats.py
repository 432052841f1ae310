"""Summary statistics for reward scores: bootstrap intervals and per-prompt win rates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN values ignored).

    With ``groups`` (e.g. each image's prompt), whole groups are resampled: the images of one prompt move
    together, and resampling them one by one would make the interval too narrow.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    values, groups = values[finite], groups[finite]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    _, group_index = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(group_index, weights=values), np.bincount(group_index)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(sums), size=(num_resamples, len(sums)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return (float(low), float(high))


def summarize(
    values: Sequence[float], confidence: float = 0.95, seed: int = 0, groups: Sequence[int] | None = None
) -> dict[str, float]:
    """Mean, median and bootstrap interval (resampling ``groups`` whole, if given) of the finite values, and how
    many were not finite."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = bootstrap_interval(values, confidence, seed=seed, groups=groups)
    return {
        "mean": float(finite.mean()) if len(finite) else float("nan"),
        "median": float(np.median(finite)) if len(finite) else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "n": int(len(finite)),
        "n_missing": int(len(values) - len(finite)),
    }


def per_prompt_means(values: Sequence[float], prompt_ids: Sequence[int]) -> dict[int, float]:
    """Mean score of each prompt's images (a prompt with no finite score is left out)."""
    values, prompt_ids = np.asarray(values, dtype=np.float64), np.asarray(prompt_ids)
    means = {}
    for prompt_id in dict.fromkeys(prompt_ids.tolist()):
        mine = values[prompt_ids == prompt_id]
        mine = mine[np.isfinite(mine)]
        if len(mine):
            means[prompt_id] = float(mine.mean())
    return means


def win_rate(model: dict[int, float], baseline: dict[int, float], tie_tolerance: float = 1e-6) -> dict[str, float]:
    """Share of prompts where the model's mean score beats the baseline's; a tie counts as half a win."""
    shared = sorted(set(model) & set(baseline))
    if not shared:
        return {"win_rate": float("nan"), "wins": 0, "ties": 0, "losses": 0, "prompts": 0}
    difference = np.array([model[p] - baseline[p] for p in shared])
    wins = int((difference > tie_tolerance).sum())
    ties = int((np.abs(difference) <= tie_tolerance).sum())
    losses = len(shared) - wins - ties
    return {
        "win_rate": (wins + 0.5 * ties) / len(shared),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "prompts": len(shared),
    }
