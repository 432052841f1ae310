"""FiFA signal 1: the preference margin, reward(chosen) - reward(rejected), from a proxy reward model.

Multi-GPU: ``pairs.map(MarginScorer(reward), batched=True, with_rank=True, num_proc=N)`` runs one
process per GPU; each process loads its own copy of the reward model on ``cuda:<rank>``. To score
many pieces of a dataset one after another (as the filter does, to resume), ``MarginWorkers`` keeps
its processes, and their loaded models, for all of them.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import datasets
import numpy as np
import pandas as pd
import torch

from fifa_hf.images import MAX_PIXELS, ImageDecodeError, decode_image
from fifa_hf.scoring.rewards import PrecomputedReward, RewardModel

MARGIN_COLUMNS = ("reward_chosen", "reward_rejected", "margin", "margin_error")


class MarginScorer:
    """Batched, picklable ``datasets.map`` function adding ``reward_chosen``, ``reward_rejected``,
    ``margin`` and ``margin_error`` (``""`` when the pair was scored).

    Pairs must be canonical (``prompt``, ``chosen``, ``rejected`` bytes), so the margin's sign follows
    the human label: positive when the reward model agrees with the human. ``absolute=True`` keeps
    ``|margin|`` instead. An image that fails to decode (or is a decompression bomb) gives NaN rewards
    and the reason (``undecodable_image: ...``, ``image_too_large: ...`` above ``max_pixels``), never a crash. ``draft``
    decodes each image only as large as the reward model's input (see ``fifa_hf.images``).
    """

    def __init__(
        self,
        reward_model: RewardModel | PrecomputedReward,
        absolute: bool = False,
        draft: bool = True,
        max_pixels: int | None = MAX_PIXELS,
    ):
        self.reward_model = reward_model
        self.absolute = absolute
        self.draft = draft
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        if isinstance(self.reward_model, PrecomputedReward):
            chosen = np.asarray(batch["reward_chosen"], dtype=np.float64)
            rejected = np.asarray(batch["reward_rejected"], dtype=np.float64)
            errors = [
                "" if math.isfinite(c) and math.isfinite(r) else "missing_reward" for c, r in zip(chosen, rejected)
            ]
        else:
            if rank is not None and torch.cuda.is_available():
                self.reward_model.device = f"cuda:{rank % torch.cuda.device_count()}"
            chosen, rejected, errors = self._score_images(batch)
        margin = chosen - rejected
        return {
            "reward_chosen": chosen.tolist(),
            "reward_rejected": rejected.tolist(),
            "margin": (np.abs(margin) if self.absolute else margin).tolist(),
            "margin_error": errors,
        }

    def _score_images(self, batch: dict[str, list]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        n = len(batch["prompt"])
        size = self.reward_model.image_size if self.draft else None
        prompts, images, rows, errors = [], [], [], [""] * n
        for i in range(n):
            try:
                pair = [decode_image(batch[column][i], size, self.max_pixels) for column in ("chosen", "rejected")]
            except ImageDecodeError as error:  # the row is marked with the reason, the batch goes on
                errors[i] = str(error)
                continue
            prompts += [batch["prompt"][i]] * 2
            images += pair
            rows.append(i)
        rewards = np.full((n, 2), np.nan)
        if rows:
            rewards[rows] = self.reward_model.score(prompts, images).reshape(-1, 2)
        return rewards[:, 0], rewards[:, 1], errors


def margin_frame(
    pairs: datasets.Dataset, scorer: MarginScorer, batch_size: int, rank: int | None = None
) -> pd.DataFrame:
    """``pairs`` with the margin columns in place of the images."""
    scored = pairs.map(
        scorer, batched=True, batch_size=batch_size, fn_kwargs={"rank": rank}, remove_columns=["chosen", "rejected"]
    )
    return scored.to_pandas()


class MarginWorkers:
    """Scores pieces of a dataset in ``num_proc`` processes (one per GPU) that live as long as this object.

    ``datasets.map(num_proc=N)`` starts N new processes per call, so scoring a dataset part by part
    would load the reward model (PickScore: 4 GB) N times per part. These processes load it once.
    They are spawned on first use (CUDA cannot run in a forked process); with ``num_proc`` None or 1
    everything runs in this process. Use as a context manager, which stops the processes.
    """

    def __init__(self, scorer: MarginScorer, batch_size: int, num_proc: int | None = None):
        self.scorer, self.batch_size, self.num_proc = scorer, batch_size, num_proc or 1
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> MarginWorkers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def __call__(self, pairs: datasets.Dataset) -> pd.DataFrame:
        if self.num_proc == 1:
            return margin_frame(pairs, self.scorer, self.batch_size)
        shards = max(1, min(self.num_proc, len(pairs)))  # never this process: it would load a model too
        pieces = [pairs.shard(shards, index, contiguous=True) for index in range(shards)]
        return pd.concat(list(self._workers().map(_score_in_worker, pieces)), ignore_index=True)

    def _workers(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            ranks = context.Queue()
            for rank in range(self.num_proc):
                ranks.put(rank)
            threads = max(1, torch.get_num_threads() // self.num_proc)  # CPU scoring: no oversubscription
            self._executor = ProcessPoolExecutor(
                self.num_proc,
                context,
                initializer=_start_worker,
                initargs=(self.scorer, self.batch_size, ranks, threads),
            )
        return self._executor


_worker: tuple[MarginScorer, int, int] | None = None  # this worker process's scorer, batch size and rank


def _start_worker(scorer: MarginScorer, batch_size: int, ranks, threads: int) -> None:
    global _worker
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()  # the parent's bar counts the rows
    _worker = (scorer, batch_size, ranks.get())


def _score_in_worker(pairs: datasets.Dataset) -> pd.DataFrame:
    scorer, batch_size, rank = _worker
    return margin_frame(pairs, scorer, batch_size, rank)
