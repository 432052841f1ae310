"""FiFA's Figure 1a in miniature: Diffusion-DPO on FiFA / full / random / QSD data, true reward vs step.

Every arm starts from the same pre-trained world model (``world_model.py``) and trains with the same
optimizer, batch and step budget through ``DiffusionDPOTrainer``; ``RewardEvaluationCallback`` samples
held-out prompts with fixed seeds every ``eval_steps`` and scores them with the world's true reward
(read from pixels). The subsets come from the real ``FiFAFilter``. The world and the budgets are
fixed by ``MiniatureArguments``' defaults, chosen before any outcome was seen.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fifa_hf.evaluation import GenerationSettings, generate, image_grid, load_for_evaluation
from fifa_hf.filter import FiFAFilter, apply_selection
from fifa_hf.world.synthetic import TEMPLATES, Attributes, describe, make_synthetic_pickapic
from fifa_hf.world.true_reward import SyntheticTrueReward
from fifa_hf.world.world_model import IMAGE_SIZE, shipped_world_model

ARMS = ("fifa", "full", "random", "qsd")


@dataclass
class MiniatureArguments:
    """The miniature replication's world and budgets (the defaults are the reported experiment)."""

    num_pairs: int = 3000
    subset_fraction: float = 0.1
    label_temperature: float = 0.1
    proxy_noise: float = 0.15
    train_steps: int = 150
    batch_size: int = 8
    learning_rate: float = 1e-4
    beta: float = 2500.0
    eval_steps: int = 25
    eval_prompts: int = 64
    sampling_steps: int = 10
    guidance_scale: float = 3.0
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    world_seed: int = 0
    model: str | None = None  # default: the shipped pre-trained world model
    output_dir: str = "fifa_demo_full"


def held_out_prompts(training_captions: set[str], count: int, seed: int) -> list[str]:
    """Clean grammar prompts that never occur in the training data."""
    rng = np.random.default_rng(seed + 10_000)
    prompts: list[str] = []
    while len(prompts) < count:
        prompt = describe(Attributes.random(rng), int(rng.integers(len(TEMPLATES))))
        if prompt not in training_captions and prompt not in prompts:
            prompts.append(prompt)
    return prompts


def build_subsets(rows: datasets.Dataset, args: MiniatureArguments, output_dir: Path) -> dict[str, datasets.Dataset]:
    """The FiFA, QSD and random subsets of one size K, through the real filter, and the full data."""
    from fifa_hf.world.demo import add_simulated_proxy_reward, synthetic_filter_config

    rows = add_simulated_proxy_reward(rows, args.proxy_noise, args.world_seed)
    config = synthetic_filter_config(output_dir / "fifa_subset", args.subset_fraction, args.world_seed)
    result = FiFAFilter(config).run(rows)
    subsets = {"full": rows}
    for method in ("fifa", "qsd", "random"):
        chosen = apply_selection(result.scores, dataclasses.replace(config, method=method))
        subsets[method] = rows.select(chosen.loc[chosen["selected"], "row_id"].to_numpy())
    return subsets


def train_arm(arm: str, data: datasets.Dataset, seed: int, prompts: list[str], args: MiniatureArguments, model: str):
    """One Diffusion-DPO run; returns its reward curve, compute, and the trained pipeline."""
    from fifa_hf.evaluation import RewardEvaluationCallback
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

    config = DiffusionDPOConfig(
        output_dir=str(Path(args.output_dir) / "runs" / f"{arm}-seed{seed}"),
        max_steps=args.train_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, args.train_steps // 10),
        beta=args.beta,
        resolution=IMAGE_SIZE,
        cache_latents=True,
        logging_steps=args.eval_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(model, config, train_dataset=data)
    callback = RewardEvaluationCallback(
        trainer, prompts, [SyntheticTrueReward()], eval_steps=args.eval_steps, settings=_sampling(args)
    )
    trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    curve = [(step, means["true_reward"]) for step, means in callback.history]
    pairs_seen = args.train_steps * args.batch_size
    return {
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "train_pairs": len(trainer.train_dataset),
        "images_seen": 2 * pairs_seen,
        "wall_seconds": seconds,
    }, trainer.pipeline


def _sampling(args: MiniatureArguments) -> GenerationSettings:
    return GenerationSettings(
        num_inference_steps=args.sampling_steps, guidance_scale=args.guidance_scale, seed=0, batch_size=64
    )


def _samples(pipeline, args: MiniatureArguments, prompts: list[str], name: str, source: dict[str, Any]) -> list:
    """Samples on the first 8 held-out prompts. ``source`` says which model drew them, so a re-run in the
    same output_dir with other settings is refused instead of silently showing stale images."""
    directory = Path(args.output_dir) / "samples" / name
    return generate(pipeline, prompts[:8], directory, _sampling(args), source=source)


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def summarize_runs(runs: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per arm: mean and std over seeds of the reward at every evaluated step, and compute."""
    summary = {}
    for arm in arms:
        mine = [run for run in runs if run["arm"] == arm]
        steps = [step for step, _ in mine[0]["curve"]]
        values = np.array([[value for _, value in run["curve"]] for run in mine])
        summary[arm] = {
            "steps": steps,
            "mean": values.mean(axis=0).tolist(),
            "std": values.std(axis=0).tolist(),
            "final_mean": float(values[:, -1].mean()),
            "final_std": float(values[:, -1].std()),
            "train_pairs": mine[0]["train_pairs"],
            "images_seen": mine[0]["images_seen"],
            "wall_seconds": float(np.mean([run["wall_seconds"] for run in mine])),
        }
    if "full" in summary:
        target = summary["full"]["final_mean"]
        for entry in summary.values():
            entry["first_step_reaching_full_final"] = first_step_reaching(
                list(zip(entry["steps"], entry["mean"])), target
            )
    return summary


def run_experiment(args: MiniatureArguments) -> dict[str, Any]:
    """Run every arm for every seed; write ``results.json``, ``report.md``, ``reward_curve.png`` and sample grids."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or str(shipped_world_model())
    rows = make_synthetic_pickapic(
        args.num_pairs, seed=args.world_seed, image_size=IMAGE_SIZE, label_temperature=args.label_temperature,
        image_format="PNG",
    )  # fmt: skip
    prompts = held_out_prompts(set(rows["caption"]), args.eval_prompts, args.world_seed)
    subsets = build_subsets(rows, args, output_dir)
    base = load_for_evaluation(model, None, "cpu", "float32")
    samples = {"base": _samples(base, args, prompts, "base", {"model": model})}
    runs = []
    for arm in args.arms:
        for seed in args.seeds:
            run, pipeline = train_arm(arm, subsets[arm], seed, prompts, args, model)
            runs.append(run)
            print(f"{arm} seed {seed}: " + ", ".join(f"{s}: {v:.3f}" for s, v in run["curve"]), flush=True)
            if seed == args.seeds[0]:
                source = {"model": model, "arm": arm, "seed": seed, "arguments": dataclasses.asdict(args)}
                samples[arm] = _samples(pipeline, args, prompts, arm, source)
    summary = summarize_runs(runs, args.arms)
    results = {
        "arguments": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()},
        "model": model,
        "held_out_prompts": prompts,
        "subset_sizes": {arm: len(subsets[arm]) for arm in args.arms},
        "subset_junk_or_unsafe": {
            arm: float(np.mean(np.array(subsets[arm]["prompt_kind"]) != "clean")) for arm in args.arms
        },
        "runs": runs,
        "summary": summary,
        "total_seconds": time.perf_counter() - start,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    _plot_curves(output_dir / "reward_curve.png", summary)
    _sample_grid(output_dir / "samples.png", samples)
    from fifa_hf.world.miniature_report import write_report

    write_report(output_dir, results)
    return results


def _plot_curves(path: Path, summary: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, entry in summary.items():
        steps, mean, std = np.array(entry["steps"]), np.array(entry["mean"]), np.array(entry["std"])
        axis.plot(steps, mean, marker="o", label=f"{arm} ({entry['train_pairs']} pairs)")
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("Diffusion-DPO step")
    axis.set_ylabel("mean true reward, held-out prompts")
    axis.set_title("Miniature FiFA: reward vs step (band: std over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _sample_grid(path: Path, samples: dict[str, list]) -> None:
    arms = list(samples)
    if not arms:
        return
    prompts = samples[arms[0]]
    rows = [[samples[arm][i].image() for arm in arms] for i in range(len(prompts))]
    image_grid(rows, [g.prompt for g in prompts], arms, tile=96).save(path)
