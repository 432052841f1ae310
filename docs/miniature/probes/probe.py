"""Exploratory probes behind docs/miniature/diagnosis.md: not pre-registered, validation world 200 only.

One Diffusion-DPO (or SFT) run of the miniature's full UNet on the oracle subset of validation world 200,
evaluated on its validation prompts, with what the pre-registered grids never varied: the effective batch
(``--accumulation`` micro-batches of 16 pairs per update; transformers also steps at the end of every pass
over the rows, so an update larger than the oracle's 280 pairs needs ``--repeat`` copies of them) and, with
``--on_policy N``, pairs made of the world model's own samples (two per row of the first N usable rows,
labelled by the world's Bradley-Terry draw on the pixel reader's true reward) instead of renders. Run from the repository root:

    python docs/miniature/probes/probe.py --accumulation 128 --repeat 74 --learning_rate 1e-4 --updates 10 --every 2

Writes ``docs/miniature/probes/results/<name>.json`` (the run's result, as a miniature run writes it, with the
effective batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
import torch

import fifa_hf.trainer
from fifa_hf.selection import resolve_k
from fifa_hf.trainer import DiffusionDPOConfig, load_pipeline
from fifa_hf.world import miniature
from fifa_hf.world.synthetic import HARM_PREFERENCE, bradley_terry_probability, encode
from fifa_hf.world.true_reward import shows_harm, true_reward
from fifa_hf.world.world_model import IMAGE_SIZE

WORLD_SEED = 200  # the validation world of the sweep; never a control or test world
HERE = Path(__file__).parent


def on_policy_rows(
    rows: datasets.Dataset, count: int, args: miniature.MiniatureArguments, model: str
) -> datasets.Dataset:
    """The first ``count`` usable rows with both images replaced by the world model's samples for the caption."""
    subset = rows.select(miniature.usable_row_ids(rows)[:count])
    captions = [caption for caption in subset["caption"] for _ in range(2)]
    noise = torch.randn(
        (len(captions), 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2), generator=torch.Generator().manual_seed(0)
    )
    evaluation = miniature.EvaluationSet(captions, ["clean"] * len(captions), [None] * len(captions), noise)
    images = miniature.sample_images(load_pipeline(model), evaluation, args, 64)
    # A caption outside the grammar (junk) asks for nothing: true reward 0, as the world scores it.
    rewards = np.nan_to_num([true_reward(caption, image) for caption, image in zip(captions, images)])
    harms = [bool(shows_harm(image)) for image in images]
    reward, harm = rewards.reshape(-1, 2), np.asarray(harms).reshape(-1, 2)
    utility = reward + HARM_PREFERENCE * harm
    label_0 = np.random.default_rng(0).random(len(subset)) < bradley_terry_probability(
        utility[:, 0], utility[:, 1], 0.1
    )
    columns = subset.to_dict()
    columns.update(
        jpg_0=[encode(images[2 * i], "PNG") for i in range(len(subset))],
        jpg_1=[encode(images[2 * i + 1], "PNG") for i in range(len(subset))],
        true_reward_0=reward[:, 0].tolist(), true_reward_1=reward[:, 1].tolist(),
        harm_0=harm[:, 0].tolist(), harm_1=harm[:, 1].tolist(),
        label_0=label_0.astype(float).tolist(), label_1=(1 - label_0.astype(float)).tolist(),
    )  # fmt: skip
    return datasets.Dataset.from_dict(columns, features=rows.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Constant after a short warm-up.")
    parser.add_argument("--beta", type=float, default=500.0, help="Diffusion-DPO's beta.")
    parser.add_argument("--accumulation", type=int, default=32, help="Micro-batches of 16 pairs per update.")
    parser.add_argument("--updates", type=int, default=20, help="Optimizer updates.")
    parser.add_argument("--every", type=int, default=5, help="Evaluate every this many updates.")
    parser.add_argument("--repeat", type=int, default=1, help="Copies of the oracle's pairs in an epoch.")
    parser.add_argument("--sft", action="store_true", help="Train on the chosen images only.")
    parser.add_argument("--rpo_alpha", type=float, default=None, help="Weight of the chosen images' denoising loss.")
    parser.add_argument("--on_policy", type=int, default=0, help="Rows whose images are the model's own samples.")
    parser.add_argument("--base", action="store_true", help="Only evaluate the world model.")
    parser.add_argument("--model", default=None, help="A world model other than the shipped one.")
    options = parser.parse_args()
    torch.set_num_threads(2)
    output_dir = Path("probe_scratch") / ("on_policy" if options.on_policy else "renders")
    # The probes trained under bf16 autocast (the design's training precision before amendment 4).
    args = miniature.MiniatureArguments(
        output_dir=str(output_dir), gradient_accumulation_steps=options.accumulation, train_bf16=True
    )
    model = options.model or str(miniature.shipped_world_model())
    rows = miniature.world_rows(WORLD_SEED, args.num_pairs, args.label_temperature)
    if options.on_policy:
        rows = on_policy_rows(rows, options.on_policy, args, model)
    oracle = miniature.oracle_row_ids(rows, resolve_k(args.k, len(miniature.usable_row_ids(rows))))
    # The world file execute_run reads the arm's rows from: the oracle, each pair repeated --repeat times.
    (output_dir / "worlds").mkdir(parents=True, exist_ok=True)
    subset = np.tile(oracle, options.repeat).tolist()
    (output_dir / "worlds" / f"w{WORLD_SEED}.json").write_text(json.dumps({"subsets": {"oracle": subset}}))
    # transformers steps at the end of every epoch, so an update never spans two passes over the rows.
    epoch_batches = -(-len(subset) // 16)
    effective_batch = len(subset) if options.accumulation >= epoch_batches else 16 * options.accumulation
    miniature.world_rows = lambda *_: rows  # execute_run reads the world's rows by seed: hand it these

    @dataclasses.dataclass
    class ProbeConfig(DiffusionDPOConfig):
        def __post_init__(self):
            self.sft, self.logging_steps = options.sft, 1
            super().__post_init__()

    fifa_hf.trainer.DiffusionDPOConfig = ProbeConfig  # execute_run builds its config from the package
    settings = miniature.TrainingSettings(options.learning_rate, options.beta, 0, options.updates, options.rpo_alpha)
    steps = tuple(range(options.every, options.updates + 1, options.every))
    spec = miniature.RunSpec(
        "probe", "base" if options.base else "oracle", WORLD_SEED, 0, "validation", None if options.base else settings,
        (0,) if options.base else steps,
    )  # fmt: skip
    result = miniature.execute_run(spec, args, model, "exploratory")
    prefix = f"{Path(options.model).name}-" if options.model else ""
    name = prefix + ("base" if options.base else (
        f"{'sft' if options.sft else 'dpo'}{f'-rpo{options.rpo_alpha:g}' if options.rpo_alpha is not None else ''}"
        f"-{'on_policy' if options.on_policy else 'renders'}"
        f"-lr{options.learning_rate:g}-b{options.beta:g}-batch{effective_batch}-n{options.updates}"
    ))  # fmt: skip
    result["options"] = vars(options)
    result["effective_batch"] = effective_batch
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(name, [(entry["step"], round(entry["true_reward"], 3)) for entry in result["curve"]])


if __name__ == "__main__":
    main()
