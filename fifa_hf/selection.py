"""Selecting the training subset: FiFA's importance score, a set-aware selection and the baselines.

``fifa`` is our reconstruction of FiFA (Yang et al., 2025, Sec. 3): pairs ranked by
``norm(margin) + alpha * norm(quality) + gamma * norm(diversity)``, top K kept. The paper does not
publish alpha, gamma, k or the normalization; our defaults (alpha = gamma = 1 on z-scored signals,
k = 5, K = 5000) weigh the three signals equally and are recorded in every output.

``setwise`` judges the subset rather than each pair alone: prompt quality is a gate (pairs below
``quality_threshold`` are never kept), then a greedy selection on the z-scored margin (or QSD) score
with diminishing returns per prompt, ``score - lambda * log(1 + pairs already taken from that
prompt)``. A prompt's pairs lose value as the subset holds more of them, so the subset covers more
prompts; no bonus grows with a prompt's distance from the others (junk prompts are the outliers).

Baselines at the same K: ``random`` (seeded), ``margin`` (margin only) and ``qsd``, quality-aware pair
ranking by ``psi(chosen) * (1 - psi(rejected))`` with the reward mapped into [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

METHODS = ("fifa", "margin", "qsd", "random", "setwise")
DEFAULT_METHOD = "setwise"  # picked by the rule of docs/selection.md from `fifa-hf demo`'s results
NORMALIZATIONS = ("zscore", "minmax", "none")
SETWISE_BASES = ("margin", "qsd")
DEFAULT_K = 5000
QSD_DEFAULT_FRACTION = 0.0533
DEFAULT_QUALITY_THRESHOLD = 0.5
DEFAULT_DIMINISHING_RETURNS = 0.5


def default_k(method: str) -> float:
    """K when none is given: 5000 pairs (FiFA's ~0.5% of Pick-a-Pic v2), or the top 5.33% for QSD."""
    return QSD_DEFAULT_FRACTION if method == "qsd" else DEFAULT_K


def normalize(values: np.ndarray, method: str = "zscore") -> np.ndarray:
    """Put a signal on a common scale; a constant signal becomes all zeros, and so does one that is undefined
    (NaN) for every pair, such as the diversity of a single prompt. One undefined for some pairs only is refused:
    its mean and spread would be NaN, and zeros would silently drop the signal for every pair."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        if np.isnan(values).all():
            return np.zeros_like(values)
        raise ValueError(
            f"A signal has {int((~finite).sum())} non-finite values among {len(values)} pairs; "
            "drop the pairs it could not score before selecting."
        )
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


def diminishing_returns_score(
    scores: np.ndarray, prompts: Sequence[str], row_ids: np.ndarray, weight: float
) -> np.ndarray:
    """Each pair's score minus ``weight * log(1 + j)``, j = better pairs of the same prompt (ties: row_id).

    Within a prompt these values fall pair by pair, so the top K by them is exactly the greedy
    selection that always takes the pair of largest marginal value given the pairs already taken.
    """
    scores = np.asarray(scores, dtype=np.float64)
    codes = pd.factorize(np.asarray(prompts, dtype=object))[0]
    order = np.lexsort((np.asarray(row_ids), -scores, codes))
    grouped = codes[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sizes = np.diff(np.r_[starts, len(grouped)])
    rank = np.arange(len(grouped)) - np.repeat(starts, sizes)
    diminished = np.empty_like(scores)
    diminished[order] = scores[order] - weight * np.log1p(rank)
    return diminished


def setwise_score(
    columns: dict[str, np.ndarray],
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD,
    diminishing_returns: float = DEFAULT_DIMINISHING_RETURNS,
    base: str = "margin",
) -> np.ndarray:
    """The greedy's value of every pair: NaN below the quality gate, else the diminished z-scored base."""
    if base not in SETWISE_BASES:
        raise ValueError(f"setwise_base must be one of {SETWISE_BASES}, got {base!r}")
    if "quality" not in columns:
        raise ValueError(
            "method='setwise' gates on prompt quality, but the scores have no 'quality' column: "
            "score with a quality scorer (--quality_scorer offline works offline) or choose another method."
        )
    quality = np.asarray(columns["quality"], dtype=np.float64)
    passed = quality >= quality_threshold  # NaN quality never passes the gate
    if base == "margin":
        raw = np.asarray(columns["margin"], dtype=np.float64)
    else:
        raw = qsd_score(np.asarray(columns["reward_chosen"]), np.asarray(columns["reward_rejected"]))
    values = np.full(len(quality), np.nan)
    if passed.any():
        prompts = np.asarray(columns["prompt"], dtype=object)[passed]
        base_scores = normalize(raw[passed], "zscore")
        values[passed] = diminishing_returns_score(
            base_scores, prompts, np.asarray(columns["row_id"])[passed], diminishing_returns
        )
    return values


def resolve_k(k: float, num_pairs: int) -> int:
    """K as a count (``k >= 1``) or a fraction of the pairs (``0 < k < 1``)."""
    if not k > 0 or (k >= 1 and not float(k).is_integer()):  # NaN is not > 0; inf is no count
        raise ValueError(f"k must be a positive count or a fraction in (0, 1), got {k}")
    return min(num_pairs, int(k) if k >= 1 else math.ceil(k * num_pairs))


def top_k(
    scores: np.ndarray,
    k: int,
    row_ids: np.ndarray,
    prompts: Sequence[str] | None = None,
    max_per_prompt: int | None = None,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Positions of the K best scores, best first; ties go to the smaller ``row_id`` (deterministic).

    With ``max_per_prompt``, a prompt already holding that many pairs is skipped for the next best.
    With ``eligible``, only those positions can be chosen (fewer than K when fewer are eligible).
    """
    scores = np.asarray(scores, dtype=np.float64)
    eligible = np.ones(len(scores), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if np.isnan(scores[eligible]).any():
        raise ValueError("Scores contain NaN; drop unscored pairs before selecting.")
    order = np.lexsort((np.asarray(row_ids), -np.where(eligible, scores, -np.inf)))[: int(eligible.sum())]
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
    method: str = DEFAULT_METHOD,
    k: float | None = None,
    alpha: float = 1.0,
    gamma: float = 1.0,
    normalization: str = "zscore",
    max_per_prompt: int | None = None,
    seed: int = 0,
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD,
    diminishing_returns: float = DEFAULT_DIMINISHING_RETURNS,
    setwise_base: str = "margin",
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the selected pairs (best first) and every pair's selection score.

    ``k=None`` takes the method's default: 5000 pairs (FiFA's ~0.5% of Pick-a-Pic v2), or the top
    5.33% for QSD. ``setwise`` keeps fewer than K when fewer pairs pass its quality gate; pairs
    below the gate score NaN.

    ``columns`` holds ``row_id``, ``prompt``, ``margin``, ``reward_chosen``, ``reward_rejected`` and,
    for FiFA, ``quality`` and ``diversity`` (either may be absent when its weight is 0), for
    ``setwise``, ``quality``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    row_ids = np.asarray(columns["row_id"])
    num_pairs = len(row_ids)
    if k is None:
        k = default_k(method)
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
    elif method == "setwise":
        scores = setwise_score(columns, quality_threshold, diminishing_returns, setwise_base)
    else:
        scores = np.random.default_rng(seed).random(num_pairs)
    prompts = list(columns["prompt"]) if max_per_prompt else None
    eligible = ~np.isnan(scores) if method == "setwise" else None
    return top_k(scores, count, row_ids, prompts, max_per_prompt, eligible), scores
