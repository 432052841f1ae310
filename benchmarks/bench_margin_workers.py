"""Margin scoring in worker processes, part by part as the filter resumes: ``MarginWorkers`` vs a new
``datasets.map(num_proc=N)`` per part.

    python benchmarks/bench_margin_workers.py [--parts 8] [--part_size 64] [--num_proc 2]

Prints how many times each way loaded the reward model and its wall seconds, measured in this one run. The
tiny CLIP loads in a fraction of a second; PickScore (CLIP-H, about 4 GB) takes far longer, and the per-part
way pays that once per part and process. Not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fifa_hf.data import map_to_pairs, unmarked
from fifa_hf.progress import datasets_bars_disabled
from fifa_hf.scoring.margin import MarginScorer, MarginWorkers
from fifa_hf.scoring.rewards import CLIPRewardModel
from fifa_hf.testing import save_tiny_clip
from fifa_hf.world.synthetic import make_synthetic_pickapic


class LoadCountingReward(CLIPRewardModel):
    """The tiny CLIP, appending a line to ``log`` every time a process loads it."""

    def __init__(self, model: str, log: str):
        super().__init__(model, device="cpu")
        self.log = log

    def _load(self):
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return super()._load()


def loads(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--part_size", type=int, default=64)
    parser.add_argument("--num_proc", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, datasets_bars_disabled():
        root = Path(directory)
        clip = str(save_tiny_clip(root / "clip"))
        rows = make_synthetic_pickapic(options.parts * options.part_size, seed=0, image_size=64)
        pairs = unmarked(map_to_pairs(rows))
        parts = [pairs.shard(options.parts, i, contiguous=True) for i in range(options.parts)]

        per_part_log, workers_log = root / "per_part.txt", root / "workers.txt"
        per_part = MarginScorer(LoadCountingReward(clip, str(per_part_log)))
        start = time.perf_counter()
        for part in parts:
            part.map(per_part, batched=True, batch_size=32, with_rank=True, num_proc=options.num_proc)
        per_part_seconds = time.perf_counter() - start

        scorer = MarginScorer(LoadCountingReward(clip, str(workers_log)))
        start = time.perf_counter()
        with MarginWorkers(scorer, batch_size=32, num_proc=options.num_proc) as workers:
            for part in parts:
                workers(part)
        workers_seconds = time.perf_counter() - start
        per_part_loads, workers_loads = loads(per_part_log), loads(workers_log)

    print(f"{options.parts} parts of {len(parts[0])} pairs, {options.num_proc} processes")
    print(f"datasets.map(num_proc) per part: {per_part_loads} reward-model loads, {per_part_seconds:.1f} s")
    print(f"MarginWorkers:                   {workers_loads} reward-model loads, {workers_seconds:.1f} s")
    print(f"loads ratio (per part / workers): {per_part_loads / max(1, workers_loads):.1f}x")


if __name__ == "__main__":
    main()
