"""One entry point that adds FiFA's three signals to canonical pairs as ``datasets`` columns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import datasets

from fifa_hf.progress import datasets_bars_disabled
from fifa_hf.scoring.cache import ScoreCache
from fifa_hf.scoring.diversity import diversity_by_prompt
from fifa_hf.scoring.margin import MarginScorer
from fifa_hf.scoring.quality import QualityScorer
from fifa_hf.scoring.rewards import PrecomputedReward, RewardModel


class PromptLookup:
    """Batched, picklable map function: one column looked up per prompt from a precomputed table."""

    def __init__(self, column: str, values: dict[str, float], errors: dict[str, str] | None = None):
        self.column, self.values, self.errors = column, values, errors or {}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        prompts = batch["prompt"]
        return {
            self.column: [self.values.get(p, math.nan) for p in prompts],
            f"{self.column}_error": [self.errors.get(p, "" if p in self.values else "not_scored") for p in prompts],
        }


@dataclass
class PromptSignalStats:
    """How many unique prompts each per-prompt signal covered and how many model calls it made."""

    unique_prompts: int = 0
    quality_cached: int = 0
    quality_scored: int = 0
    quality_failed: int = 0
    diversity_embedded: int = 0
    skipped: list[str] = field(default_factory=list)


def add_prompt_signals(
    dataset: datasets.Dataset,
    quality_scorer: QualityScorer | None = None,
    embedder=None,
    k: int = 5,
    cache: ScoreCache | None = None,
    knn_method: str = "auto",
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, PromptSignalStats]:
    """Add ``quality`` and ``diversity`` (and their ``*_error`` columns), each computed once per unique prompt.

    A signal whose scorer or embedder is None is skipped (its FiFA weight is 0). The model calls show
    one bar each; copying the per-prompt values onto the rows is a lookup and shows none.
    """
    prompts = list(dict.fromkeys(dataset["prompt"]))
    stats = PromptSignalStats(unique_prompts=len(prompts))
    if quality_scorer is None:
        stats.skipped.append("quality")
    else:
        result = quality_scorer(prompts, cache=cache)
        stats.quality_cached, stats.quality_scored = result.num_cached, result.num_scored
        stats.quality_failed = len(result.errors)
        with datasets_bars_disabled():
            dataset = dataset.map(
                PromptLookup("quality", result.scores, result.errors), batched=True, num_proc=num_proc
            )
    if embedder is None:
        stats.skipped.append("diversity")
    else:
        terms = diversity_by_prompt(prompts, embedder, k=k, method=knn_method)
        stats.diversity_embedded = len(terms)
        with datasets_bars_disabled():
            dataset = dataset.map(PromptLookup("diversity", terms), batched=True, num_proc=num_proc)
    return dataset, stats


def add_signals(
    pairs: datasets.Dataset,
    reward_model: RewardModel | PrecomputedReward | None = None,
    quality_scorer: QualityScorer | None = None,
    embedder=None,
    k: int = 5,
    cache: ScoreCache | None = None,
    margin_absolute: bool = False,
    batch_size: int = 64,
    num_proc: int | None = None,
    knn_method: str = "auto",
) -> tuple[datasets.Dataset, PromptSignalStats]:
    """Add the margin (per pair), quality and diversity (per unique prompt) columns to canonical pairs.

    Pass ``None`` for a signal to skip it. With ``num_proc`` on a multi-GPU machine, each process
    scores rewards on its own GPU (``with_rank``).
    """
    if reward_model is not None:
        pairs = pairs.map(
            MarginScorer(reward_model, absolute=margin_absolute),
            batched=True,
            batch_size=batch_size,
            with_rank=True,
            num_proc=num_proc,
            desc="Scoring preference margins",
        )
    pairs, stats = add_prompt_signals(pairs, quality_scorer, embedder, k, cache, knn_method, num_proc)
    if reward_model is None:
        stats.skipped.insert(0, "margin")
    return pairs, stats
