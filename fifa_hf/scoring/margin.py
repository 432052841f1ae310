"""FiFA signal 1: the preference margin, reward(chosen) - reward(rejected), from a proxy reward model.

Multi-GPU: ``pairs.map(MarginScorer(reward), batched=True, with_rank=True, num_proc=N)`` runs one
process per GPU; each process loads its own copy of the reward model on ``cuda:<rank>``.
"""

from __future__ import annotations

import math

import numpy as np
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
