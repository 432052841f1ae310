"""Selection time of every method on 10k, 100k and 1M scored pairs (10 pairs a prompt).

    python benchmarks/bench_selection.py [--sizes 10000 100000 1000000] [--k 0.005]

Times ``fifa_hf.filter.apply_selection`` on a scores table, which is what ``fifa-hf select`` runs after
reading ``scores.parquet``. Target: ``setwise`` on 1M pairs over 100k prompts within 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from fifa_hf.filter import FiFAConfig, apply_selection
from fifa_hf.selection import METHODS

TARGET_SECONDS = 60.0


def synthetic_scores(num_pairs: int, pairs_per_prompt: int = 10, seed: int = 0) -> pd.DataFrame:
    """A scores table shaped like ``scores.parquet``: prompts of realistic length, random signals."""
    rng = np.random.default_rng(seed)
    num_prompts = max(1, num_pairs // pairs_per_prompt)
    prompts = np.array(
        [f"prompt number {i}: a cat in a hat on a mat, digital art, trending" for i in range(num_prompts)]
    )
    prompt_index = rng.integers(num_prompts, size=num_pairs)
    reward_chosen, reward_rejected = rng.normal(21, 1, num_pairs), rng.normal(20.5, 1, num_pairs)
    quality = rng.random(num_prompts)
    diversity = rng.normal(0, 1, num_prompts)
    return pd.DataFrame(
        {
            "row_id": np.arange(num_pairs),
            "prompt": prompts[prompt_index],
            "drop_reason": "",
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "margin": reward_chosen - reward_rejected,
            "quality": quality[prompt_index],
            "diversity": diversity[prompt_index],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=float, default=0.005, help="Pairs kept: a count or a fraction.")
    args = parser.parse_args()
    print(f"{'pairs':>9} {'prompts':>8} " + " ".join(f"{m:>9}" for m in METHODS) + "   (seconds)")
    for size in args.sizes:
        scores = synthetic_scores(size)
        seconds = {}
        for method in METHODS:
            config = FiFAConfig(method=method, k=args.k)
            start = time.perf_counter()
            selected = apply_selection(scores, config)
            seconds[method] = time.perf_counter() - start
            assert selected["selected"].sum() > 0
        print(f"{size:>9} {scores['prompt'].nunique():>8} " + " ".join(f"{seconds[m]:>9.2f}" for m in METHODS))
    verdict = "within" if seconds["setwise"] <= TARGET_SECONDS else "OVER"
    print(
        f"setwise on {size} pairs: {seconds['setwise']:.1f} s, {verdict} the {TARGET_SECONDS:.0f} s target; "
        f"{seconds['setwise'] / seconds['margin']:.1f}x margin-only's time"
    )


if __name__ == "__main__":
    main()
