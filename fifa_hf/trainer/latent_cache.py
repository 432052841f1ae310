"""``cache_latents``: every pair's VAE latent distributions and every prompt's embeddings, computed once.

The cache is built by the (local) main process only; the other processes of a distributed run load its
result from a file the main process writes for them and removes once all have read it. Latents and
embeddings are kept in half precision when they fit, which halves the memory per pair.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fifa_hf.images import decode_image
from fifa_hf.trainer.collator import crop_pair

FLOAT16_MAX = torch.finfo(torch.float16).max


def to_half_if_finite(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float16 when every value fits (|x| < 65504), else unchanged: a VAE whose latents overflow
    float16 keeps them in its own precision."""
    if tensor.is_floating_point() and tensor.abs().max() < FLOAT16_MAX:
        return tensor.half()
    return tensor


@dataclass
class LatentCache:
    """VAE latent distributions (per flip) and prompt embeddings computed once, sampled every step."""

    latent_parameters: dict[bool, torch.Tensor]  # flip -> (pairs, 2, 2 * latent channels, h, w)
    crop_top_lefts: dict[bool, torch.Tensor]  # flip -> (pairs, 2)
    original_sizes: torch.Tensor  # (pairs, 2)
    prompt_index: torch.Tensor  # pair -> row of prompt_embeds
    prompt_embeds: torch.Tensor
    empty_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    empty_pooled_prompt_embeds: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"latent_parameters.{int(f)}": t.contiguous() for f, t in self.latent_parameters.items()}
        state |= {f"crop_top_lefts.{int(f)}": t.contiguous() for f, t in self.crop_top_lefts.items()}
        for name in ("original_sizes", "prompt_index", "prompt_embeds", "empty_prompt_embeds"):
            state[name] = getattr(self, name).contiguous()
        for name in ("pooled_prompt_embeds", "empty_pooled_prompt_embeds"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LatentCache:
        def by_flip(prefix: str) -> dict[bool, torch.Tensor]:
            return {bool(int(k.rsplit(".", 1)[1])): v for k, v in state.items() if k.startswith(prefix + ".")}

        return cls(
            latent_parameters=by_flip("latent_parameters"),
            crop_top_lefts=by_flip("crop_top_lefts"),
            original_sizes=state["original_sizes"],
            prompt_index=state["prompt_index"],
            prompt_embeds=state["prompt_embeds"],
            empty_prompt_embeds=state["empty_prompt_embeds"],
            pooled_prompt_embeds=state.get("pooled_prompt_embeds"),
            empty_pooled_prompt_embeds=state.get("empty_pooled_prompt_embeds"),
        )

    def __len__(self) -> int:
        return len(self.prompt_index)

    def batch(self, pair_index: torch.Tensor, flips: torch.Tensor, dropped: torch.Tensor):
        """Latent parameters (float32), crops, original sizes and prompt embeddings of some pairs."""
        parameters = torch.empty(
            (len(pair_index), *self.latent_parameters[False].shape[1:]), dtype=torch.float32
        )  # fmt: skip
        crops = torch.empty((len(pair_index), 2), dtype=self.crop_top_lefts[False].dtype)
        for flip in self.latent_parameters:
            rows = flips == flip
            if rows.any():
                parameters[rows] = self.latent_parameters[flip][pair_index[rows]].float()
                crops[rows] = self.crop_top_lefts[flip][pair_index[rows]]
        hidden = self.prompt_embeds[self.prompt_index[pair_index]].float()
        hidden[dropped] = self.empty_prompt_embeds.float()
        pooled = None
        if self.pooled_prompt_embeds is not None:
            pooled = self.pooled_prompt_embeds[self.prompt_index[pair_index]].float()
            pooled[dropped] = self.empty_pooled_prompt_embeds.float()
        return parameters, crops, self.original_sizes[pair_index], hidden, pooled


class _PairPixels:
    """Map-style view of the pairs as pixel tensors, both flips, for a DataLoader's workers."""

    def __init__(self, pairs: datasets.Dataset, resolution: int, flips: tuple[bool, ...]):
        self.pairs, self.resolution, self.flips = pairs.select_columns(["chosen", "rejected"]), resolution, flips

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        row = self.pairs[index]
        chosen, rejected = decode_image(row["chosen"]), decode_image(row["rejected"])
        return {flip: crop_pair(chosen, rejected, self.resolution, False, flip) for flip in self.flips}


def _collate(items: list[dict]) -> dict:
    return {
        flip: (
            torch.stack([torch.stack([winner, loser]) for winner, loser, _, _ in (item[flip] for item in items)]),
            [crop for *_, crop in (item[flip] for item in items)],
            [size for _, _, size, _ in (item[flip] for item in items)],
        )
        for flip in items[0]
    }


@torch.no_grad()
def build_latent_cache(
    pairs: datasets.Dataset,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
    resolution: int,
    flips: tuple[bool, ...],
    batch_size: int,
    num_workers: int = 0,
    description: str = "Caching VAE latents",
    show_progress: bool = True,
) -> LatentCache:
    """Encode every pair (each flip) and every unique prompt once; one progress bar over the pairs (on the
    main process, unless ``show_progress`` is off)."""
    latents: dict[bool, list[torch.Tensor]] = {flip: [] for flip in flips}
    crops: dict[bool, list] = {flip: [] for flip in flips}
    sizes: list = []
    loader = torch.utils.data.DataLoader(
        _PairPixels(pairs, resolution, flips), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    with tqdm(
        total=len(pairs), desc=description, unit="pair",
        disable=not (show_progress and PartialState().is_local_main_process),
    ) as bar:  # fmt: skip
        for batch in loader:
            for flip, (pixels, batch_crops, batch_sizes) in batch.items():
                parameters = encode_images(pixels.flatten(0, 1)).unflatten(0, (len(pixels), 2))
                latents[flip].append(parameters.cpu())
                crops[flip] += batch_crops
                if flip is False:
                    sizes += batch_sizes
            bar.update(len(pixels))
    unique = list(dict.fromkeys(pairs["prompt"]))
    position = {prompt: i for i, prompt in enumerate(unique)}
    embeds, pooled = zip(*(encode_prompts(unique[i : i + 64]) for i in range(0, len(unique), 64)))
    empty, empty_pooled = encode_prompts([""])
    has_pooled = pooled[0] is not None
    return LatentCache(
        latent_parameters={flip: to_half_if_finite(torch.cat(latents[flip])) for flip in flips},
        crop_top_lefts={flip: torch.tensor(crops[flip]) for flip in flips},
        original_sizes=torch.tensor(sizes),
        prompt_index=torch.tensor([position[p] for p in pairs["prompt"]]),
        prompt_embeds=to_half_if_finite(torch.cat(embeds).cpu()),
        empty_prompt_embeds=to_half_if_finite(empty.cpu()),
        pooled_prompt_embeds=to_half_if_finite(torch.cat(pooled).cpu()) if has_pooled else None,
        empty_pooled_prompt_embeds=to_half_if_finite(empty_pooled.cpu()) if has_pooled else None,
    )


def shared_latent_cache(build: Callable[[], LatentCache], directory: str, name: str) -> LatentCache:
    """Run ``build`` on the local main process only; the other local processes load its result.

    The exchange file, ``.{name}-node<first rank of the node>.safetensors`` in ``directory`` (one per node, so nodes
    sharing ``directory`` never collide), is written fresh by this run (never reused from an earlier one) and
    removed once every process has read it.
    """
    state = PartialState()
    if state.num_processes == 1:
        return build()
    node = state.process_index - state.local_process_index
    exchange_file = os.path.join(directory, f".{name}-node{node}.safetensors")
    with state.local_main_process_first():
        if state.is_local_main_process:
            cache = build()
            os.makedirs(os.path.dirname(exchange_file) or ".", exist_ok=True)
            save_file(cache.state_dict(), exchange_file)
        else:
            cache = LatentCache.from_state_dict(load_file(exchange_file))
    state.wait_for_everyone()
    if state.is_local_main_process:
        os.remove(exchange_file)
    return cache
