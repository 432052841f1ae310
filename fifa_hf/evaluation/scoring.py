"""Score generated images with reward models, and compare a model's scores with a baseline's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from fifa_hf.errors import InputError
from fifa_hf.evaluation.generation import Generation
from fifa_hf.evaluation.stats import per_prompt_means, summarize, win_rate
from fifa_hf.progress import quiet_loading
from fifa_hf.scoring.rewards import RewardModel


def score(
    generations: Sequence[Generation],
    reward_models: Sequence[RewardModel],
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """One score per generated image and reward model (each model is loaded once, on first use).

    ``progress`` shows one bar over the images, scored by every model.
    """
    names = [reward.name for reward in reward_models]
    if len(set(names)) != len(names):
        raise InputError(f"Reward models need distinct names, got {names}; pass name= to tell them apart.")
    scores = {name: np.empty(len(generations), dtype=np.float64) for name in names}
    bar = tqdm(total=len(generations), desc=f"Scoring images ({', '.join(names)})", unit="image", disable=not progress)
    with bar, quiet_loading(("transformers",)):  # reward models load through transformers
        for start in range(0, len(generations), batch_size):
            batch = generations[start : start + batch_size]
            images = [generation.image() for generation in batch]
            prompts = [generation.prompt for generation in batch]
            for reward in reward_models:
                scores[reward.name][start : start + len(batch)] = reward.score(prompts, images)
            bar.update(len(batch))
    return scores


def compare(
    generations: Sequence[Generation],
    scores: dict[str, np.ndarray],
    baseline_generations: Sequence[Generation] | None = None,
    baseline_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per reward: the model's (and baseline's) summary, and the model's per-prompt win rate over the baseline."""
    prompt_ids = [g.prompt_index for g in generations]
    results = {}
    for name, values in scores.items():
        entry = {"model": summarize(values, groups=prompt_ids)}
        if baseline_scores is not None and baseline_generations is not None:
            baseline_values, baseline_ids = baseline_scores[name], [g.prompt_index for g in baseline_generations]
            entry["baseline"] = summarize(baseline_values, groups=baseline_ids)
            entry["win_rate"] = win_rate(
                per_prompt_means(values, prompt_ids), per_prompt_means(baseline_values, baseline_ids)
            )
        results[name] = entry
    return results
