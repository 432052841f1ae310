"""Selecting the training subset: FiFA's importance score and the baselines it is compared with.

FiFA (Yang et al., 2025, Sec. 3) ranks pairs by ``norm(margin) + alpha * norm(quality) +
gamma * norm(diversity)`` and keeps the top K. The paper does not publish alpha, gamma, k or the
normalization; our defaults (alpha = gamma = 1 on z-scored signals, k = 5, K = 5000) weigh the three
signals equally and are recorded in every output.

Baselines at the same K: ``random`` (seeded), ``margin`` (margin only) and ``qsd``, quality-aware pair
ranking by ``psi(chosen) * (1 - psi(rejected))`` with the reward mapped into [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METHODS = ("fifa", "margin", "qsd", "random")
NORMALIZATIONS = ("zscore", "minmax", "none")
DEFAULT_K = 5000
QSD_DEFAULT_FRACTION = 0.0533


def normalize(values: np.ndarray, method: str = "zscore") -> np.ndarray:
    """Put a signal on a common scale; a constant signal becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    if method == "none":
        return values
    if method == "zscore":
        std = values.std()
        return (values - values.mean()) / std if std > 0 else np.zeros_like(values)
    if method == "minmax":
        span = values.max() - values.min() if len(values) else 0.0
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")


def fifa_score(
    margin: np.ndarray,
    quality: np.ndarray | None = None,
    diversity: np.ndarray | None = None,
    alpha: float = 1.0,
    gamma: float = 1.0,
    normalization: str = "zscore",
) -> np.ndarray:
    """``norm(margin) + alpha * norm(quality) + gamma * norm(diversity)``; a missing signal counts 0."""
    score = normalize(margin, normalization)
    for weight, signal in ((alpha, quality), (gamma, diversity)):
        if weight and signal is not None:
            score = score + weight * normalize(signal, normalization)
    return score


def qsd_score(reward_chosen: np.ndarray, reward_rejected: np.ndarray) -> np.ndarray:
    """``psi(chosen) * (1 - psi(rejected))`` with psi the min-max map of all rewards into [0, 1]."""
    rewards = np.concatenate([reward_chosen, reward_rejected]).astype(np.float64)
    low, span = rewards.min(), rewards.max() - rewards.min()
    span = span if span > 0 else 1.0
    return ((reward_chosen - low) / span) * (1.0 - (reward_rejected - low) / span)


def resolve_k(k: float, num_pairs: int) -> int:
    """K as a count (``k >= 1``) or a fraction of the pairs (``0 < k < 1``)."""
    if k <= 0 or (k >= 1 and k != int(k)):
        raise ValueError(f"k must be a positive count or a fraction in (0, 1), got {k}")
    return min(num_pairs, int(k) if k >= 1 else math.ceil(k * num_pairs))


def top_k(
    scores: np.ndarray,
    k: int,
    row_ids: np.ndarray,
    prompts: Sequence[str] | None = None,
    max_per_prompt: int | None = None,
) -> np.ndarray:
    """Positions of the K best scores, best first; ties go to the smaller ``row_id`` (deterministic).

    With ``max_per_prompt``, a prompt already holding that many pairs is skipped for the next best.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("Scores contain NaN; drop unscored pairs before selecting.")
    order = np.lexsort((np.asarray(row_ids), -scores))
    if max_per_prompt is None:
        return order[:k]
    if prompts is None:
        raise ValueError("max_per_prompt needs the prompts.")
    taken: dict[str, int] = {}
    chosen = []
    for position in order:
        prompt = prompts[position]
        if taken.get(prompt, 0) < max_per_prompt:
            taken[prompt] = taken.get(prompt, 0) + 1
            chosen.append(position)
            if len(chosen) == k:
                break
    return np.asarray(chosen, dtype=np.int64)


def select(
    columns: dict[str, np.ndarray],
    method: str = "fifa",
    k: float | None = None,
    alpha: float = 1.0,
    gamma: float = 1.0,
    normalization: str = "zscore",
    max_per_prompt: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the selected pairs (best first) and every pair's selection score.

    ``k=None`` takes the method's default: 5000 pairs (FiFA's ~0.5% of Pick-a-Pic v2), or the top
    5.33% for QSD.

    ``columns`` holds ``row_id``, ``prompt``, ``margin``, ``reward_chosen``, ``reward_rejected`` and,
    for FiFA, ``quality`` and ``diversity`` (either may be absent when its weight is 0).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    row_ids = np.asarray(columns["row_id"])
    num_pairs = len(row_ids)
    if k is None:
        k = QSD_DEFAULT_FRACTION if method == "qsd" else DEFAULT_K
    count = resolve_k(k, num_pairs)
    if method == "fifa":
        missing = [c for c, w in (("quality", alpha), ("diversity", gamma)) if w and c not in columns]
        if missing:
            raise ValueError(f"FiFA with non-zero weights needs the column(s) {missing}.")
        scores = fifa_score(
            columns["margin"], columns.get("quality"), columns.get("diversity"), alpha, gamma, normalization
        )
    elif method == "margin":
        scores = np.asarray(columns["margin"], dtype=np.float64)
    elif method == "qsd":
        scores = qsd_score(np.asarray(columns["reward_chosen"]), np.asarray(columns["reward_rejected"]))
    else:
        scores = np.random.default_rng(seed).random(num_pairs)
    prompts = list(columns["prompt"]) if max_per_prompt else None
    return top_k(scores, count, row_ids, prompts, max_per_prompt), scores
