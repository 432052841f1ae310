"""How much of a training step is signal: the gradient noise scale of a loss on a subset of a world.

A step of batch B follows the mean gradient G plus noise of covariance Sigma / B. McCandlish et al. (2018,
"An Empirical Model of Large-Batch Training") call ``B_noise = tr(Sigma) / |G|^2`` the batch at which signal
and noise are equal: far below it, Adam's normalised steps are mostly noise, so a larger learning rate
moves the model without teaching it. Both moments are estimated from per-example gradients with running
sums (memory of a few gradients, whatever the number of examples), |G|^2 unbiased and with a jackknife
interval.

``python -m fifa_hf.world.gradient_noise`` measures it for Diffusion-DPO (and the supervised loss on the
chosen images) at the world model's weights, on a validation world's pairs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class GradientNoise:
    """Moments of per-example gradients; ``critical_batch`` is B_noise."""

    examples: int
    signal: float  # unbiased estimate of |G|^2
    signal_se: float  # its jackknife standard error over the chunks
    noise: float  # tr(Sigma), the per-example gradient variance summed over parameters

    @property
    def critical_batch(self) -> float:
        return self.noise / self.signal if self.signal > 0 else math.inf

    def critical_batch_interval(self, z: float = 1.96) -> tuple[float, float]:
        """B_noise at signal +- z standard errors; the upper end is infinite where no signal is resolved."""
        high, low = self.signal + z * self.signal_se, self.signal - z * self.signal_se
        return (self.noise / high if high > 0 else math.inf, self.noise / low if low > 0 else math.inf)


class GradientMoments:
    """Per-chunk sums of per-example gradients (examples dealt round-robin) and the sum of their squared norms.

    |G|^2 is estimated from the products of different chunks' sums, which share no example, so it is unbiased;
    leaving one chunk out at a time gives its jackknife standard error."""

    def __init__(self, chunks: int = 8) -> None:
        if chunks < 3:
            raise ValueError(f"A jackknife over chunks needs at least 3 chunks, got {chunks}.")
        self.sums: list[torch.Tensor | None] = [None] * chunks
        self.counts = [0] * chunks
        self.squared_norms = 0.0

    def add(self, gradient: torch.Tensor) -> None:
        chunk = sum(self.counts) % len(self.counts)
        gradient = gradient.detach().double().flatten()
        total = self.sums[chunk]
        self.sums[chunk] = gradient.clone() if total is None else total.add_(gradient)
        self.counts[chunk] += 1
        self.squared_norms += float(gradient.dot(gradient))

    def result(self) -> GradientNoise:
        n = sum(self.counts)
        if n < len(self.counts):
            raise ValueError(f"The gradient noise scale needs at least {len(self.counts)} examples, got {n}.")
        sums = torch.stack(self.sums)
        gram = sums @ sums.T  # products of every two chunks' sums
        counts = torch.tensor(self.counts, dtype=torch.float64)
        pairs = torch.outer(counts, counts)
        off_diagonal = ~torch.eye(len(counts), dtype=torch.bool)

        def cross(keep: torch.Tensor) -> float:
            mask = off_diagonal & keep[:, None] & keep[None, :]
            return float(gram[mask].sum() / pairs[mask].sum())

        everyone = torch.ones(len(counts), dtype=torch.bool)
        signal = cross(everyone)
        left_out = torch.tensor(
            [cross(everyone.clone().index_fill_(0, torch.tensor([i]), False)) for i in range(len(counts))]
        )
        m = len(counts)
        signal_se = float(((m - 1) / m * ((left_out - left_out.mean()) ** 2).sum()).sqrt())
        mean_norm = float(gram.sum()) / n**2
        noise = (self.squared_norms - n * mean_norm) / (n - 1)
        return GradientNoise(examples=n, signal=signal, signal_se=signal_se, noise=noise)


def measure(
    losses: Iterable[Callable[[], torch.Tensor]],
    parameters: list[torch.nn.Parameter],
    moments: GradientMoments | None = None,
    description: str = "Per-example gradients",
    total: int | None = None,
) -> GradientNoise:
    """Back-propagate each example's loss (a closure) and accumulate the moments of its gradient."""
    moments = moments or GradientMoments()
    for loss in tqdm(losses, total=total, desc=description):
        for parameter in parameters:
            parameter.grad = None
        loss().backward()
        moments.add(torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]))
    return moments.result()


def diffusion_dpo_gradient_noise(
    world_seed: int, arm: str, sft: bool, examples: int, model: str | None = None, num_pairs: int | None = None
) -> GradientNoise:
    """The gradient noise scale of ``DiffusionDPOTrainer``'s loss (or ``sft``) at the world model's weights,
    over ``examples`` pair visits in one arm of a world (``full`` or ``oracle``), full UNet, as the miniature
    trains."""
    from fifa_hf.selection import resolve_k
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
    from fifa_hf.world.miniature import MiniatureArguments, oracle_row_ids, usable_row_ids, world_rows
    from fifa_hf.world.world_model import IMAGE_SIZE, shipped_world_model

    args = MiniatureArguments()
    rows = world_rows(world_seed, num_pairs or args.num_pairs, args.label_temperature)
    usable = usable_row_ids(rows)
    ids = usable if arm == "full" else oracle_row_ids(rows, resolve_k(args.k, len(usable)))
    generator = torch.Generator().manual_seed(world_seed)
    # A subset smaller than ``examples`` is cycled through: each visit draws its own noise and timestep.
    ids = np.resize(ids[torch.randperm(len(ids), generator=generator).numpy()], examples)
    config = DiffusionDPOConfig(
        output_dir="gradient_noise_scratch", per_device_train_batch_size=len(ids), resolution=IMAGE_SIZE,
        beta=args.beta, sft=sft, cache_latents=True, use_cpu=True, bf16=args.bf16, report_to="none",
        disable_tqdm=True, seed=0, save_strategy="no",
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(model or shipped_world_model(), config, train_dataset=rows.select(ids))
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]

    def example_loss(index: int) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            one = {name: value[index : index + 1] for name, value in inputs.items() if torch.is_tensor(value)}
            with trainer.compute_loss_context_manager():
                return trainer.compute_loss(trainer.model, one)

        return loss

    count = len(inputs["pair_index"])
    label = f"{'SFT' if sft else 'Diffusion-DPO'} gradients, {arm} arm of world {world_seed}"
    return measure((example_loss(i) for i in range(count)), parameters, description=label, total=count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world_seed", type=int, default=200, help="A validation world (never a test world).")
    parser.add_argument("--examples", type=int, default=2048, help="Pair visits (one gradient each) per measurement.")
    parser.add_argument("--output", default="docs/miniature/gradient_noise.json", help="Where the figures go.")
    options = parser.parse_args(argv)
    results = []
    for arm, sft in (("oracle", False), ("full", False), ("oracle", True)):
        torch.manual_seed(0)
        noise = diffusion_dpo_gradient_noise(options.world_seed, arm, sft, options.examples)
        entry = {"arm": arm, "loss": "sft" if sft else "sigmoid", **asdict(noise)}
        bounds = [noise.critical_batch, *noise.critical_batch_interval()]
        # JSON has no infinity: an unresolved bound is written as null.
        entry["critical_batch"], *entry["critical_batch_95"] = [None if math.isinf(b) else b for b in bounds]
        results.append(entry)
        print(json.dumps(entry))
    Path(options.output).write_text(json.dumps({"world_seed": options.world_seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
