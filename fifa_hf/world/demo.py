"""``fifa-hf demo``: FiFA vs random, margin-only and QSD selection on the synthetic Pick-a-Pic, offline.

The synthetic world knows each image's true reward, so a selection can be judged directly: do the
kept labels agree with the true preference, how many junk or unsafe prompts slip in, how many
distinct prompts are covered. The proxy reward is a SIMULATION (true reward plus Gaussian noise)
standing in for PickScore; quality is the offline heuristic; diversity uses the real MiniLM.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from fifa_hf.filter import FiFAConfig, FiFAFilter, apply_selection
from fifa_hf.scoring.diversity import offline_minilm_path
from fifa_hf.selection import METHODS
from fifa_hf.world.synthetic import HARM_PREFERENCE, make_synthetic_pickapic

SIMULATED_REWARD_COLUMNS = ("simulated_proxy_reward_0", "simulated_proxy_reward_1")


@dataclass
class DemoArguments:
    """Run FiFA and its baselines on the synthetic Pick-a-Pic and report against the known truth."""

    num_pairs: int = field(default=4000, metadata={"help": "Synthetic preference pairs."})
    k: float = field(
        default=0.1, metadata={"help": "Pairs every method keeps: a count or a fraction of the scored pairs."}
    )
    proxy_noise: float = field(
        default=0.15, metadata={"help": "Std of the Gaussian noise of the simulated proxy reward."}
    )
    label_temperature: float = field(
        default=0.1, metadata={"help": "Label noise of the synthetic humans (Bradley-Terry temperature)."}
    )
    alpha: float = field(default=1.0, metadata={"help": "FiFA weight of prompt quality."})
    gamma: float = field(default=1.0, metadata={"help": "FiFA weight of prompt diversity."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic world and of the random baseline."})
    output_dir: str = field(default="fifa_demo", metadata={"help": "Where the report, plots and subset are written."})
    full: bool = field(
        default=False,
        metadata={
            "help": "Run the miniature replication instead: Diffusion-DPO on FiFA / full / random / QSD data of the "
            "synthetic world, true reward vs step (about 12 minutes on 2 cores). Only the options below apply."
        },
    )
    train_steps: int = field(default=150, metadata={"help": "--full: Diffusion-DPO steps per run."})
    eval_steps: int = field(default=25, metadata={"help": "--full: evaluate the true reward every N steps."})
    num_seeds: int = field(default=3, metadata={"help": "--full: training seeds per arm."})


def add_simulated_proxy_reward(
    rows: datasets.Dataset, noise: float, seed: int, erratic_junk: bool = True
) -> datasets.Dataset:
    """A stand-in for PickScore, clearly named as a simulation (the rules are in ``docs/world.md``).

    On clean and unsafe prompts it is the prompter's utility (the true reward, plus the harm
    preference that a reward model trained on Pick-a-Pic's raw preferences learns) plus N(0, noise^2).
    On junk prompts it is erratic: as widely spread as on clean prompts, but unrelated to the images
    (``erratic_junk=False`` gives world version 1, where junk gets the same small noise as the rest).
    """
    rng = np.random.default_rng(seed + 1)
    junk = np.asarray(rows["prompt_kind"]) == "junk"
    columns = {}
    for name, index in zip(SIMULATED_REWARD_COLUMNS, "01"):
        utility = np.asarray(rows[f"true_reward_{index}"]) + HARM_PREFERENCE * np.asarray(rows[f"harm_{index}"])
        columns[name] = utility + rng.normal(0, noise, len(rows))
    spread = np.concatenate([columns[name][~junk] for name in SIMULATED_REWARD_COLUMNS]).std()
    for name in SIMULATED_REWARD_COLUMNS:
        if erratic_junk:
            columns[name][junk] = rng.normal(0, spread, int(junk.sum()))
        rows = rows.add_column(name, columns[name].tolist())
    return rows


def selection_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """Judge selected source rows against the truth of the synthetic world."""
    chosen_is_0 = rows["label_0"].to_numpy() == 1
    truth_0, truth_1 = rows["true_reward_0"].to_numpy(), rows["true_reward_1"].to_numpy()
    chosen = np.where(chosen_is_0, truth_0, truth_1)
    rejected = np.where(chosen_is_0, truth_1, truth_0)
    agreement = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
    return {
        "pairs": len(rows),
        "label agreement with truth": float(agreement.mean()),
        "true reward gap": float((chosen - rejected).mean()),
        "junk or unsafe prompts": float((rows["prompt_kind"] != "clean").mean()),
        "distinct prompts": int(rows["caption"].nunique()),
    }


def synthetic_filter_config(output_dir: str | Path, k: float, seed: int, **overrides) -> FiFAConfig:
    """The offline filter the demos run: simulated proxy reward, heuristic quality, real MiniLM diversity."""
    return FiFAConfig(
        dataset="synthetic-pickapic",
        output_dir=str(output_dir),
        reward_type="precomputed",
        reward_columns=",".join(SIMULATED_REWARD_COLUMNS),
        quality_scorer="heuristic",
        embedding_model=offline_minilm_path(),
        k=k,
        seed=seed,
        license="apache-2.0",
        **overrides,
    )


def run_demo(args: DemoArguments) -> pd.DataFrame:
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    rows = make_synthetic_pickapic(args.num_pairs, seed=args.seed, label_temperature=args.label_temperature)
    rows = add_simulated_proxy_reward(rows, args.proxy_noise, args.seed)
    config = synthetic_filter_config(output_dir / "subset", args.k, args.seed, alpha=args.alpha, gamma=args.gamma)
    result = FiFAFilter(config).run(rows)
    truth = rows.select_columns(["caption", "label_0", "true_reward_0", "true_reward_1", "prompt_kind"]).to_pandas()
    table = {
        "all scored pairs": selection_metrics(
            truth.iloc[result.scores.loc[result.scores["drop_reason"] == "", "row_id"]]
        )
    }
    for method in METHODS:
        chosen = apply_selection(result.scores, dataclasses.replace(config, method=method))
        table[method] = selection_metrics(truth.iloc[chosen.loc[chosen["selected"], "row_id"]])
    frame = pd.DataFrame(table).T
    frame["pairs"] = frame["pairs"].astype(int)
    frame["distinct prompts"] = frame["distinct prompts"].astype(int)
    write_demo_report(output_dir, frame, args, result, time.perf_counter() - start)
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 3 decimals) without pandas' optional tabulate dependency."""
    header = "| | " + " | ".join(frame.columns) + " |"
    rule = "|---" * (len(frame.columns) + 1) + "|"
    cells = [
        "| " + " | ".join([str(index)] + [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]) + " |"
        for index, row in zip(frame.index, frame.itertuples(index=False))
    ]
    return "\n".join([header, rule, *cells])


def write_demo_report(output_dir: Path, frame: pd.DataFrame, args: DemoArguments, result, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = ["label agreement with truth", "junk or unsafe prompts", "true reward gap"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(12, 3.5))
    for axis, metric in zip(axes, metrics):
        axis.bar(frame.index, frame[metric], color=["gray", "C0", "C1", "C2", "C3"][: len(frame)])
        axis.set_title(metric)
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(output_dir / "selection_metrics.png", dpi=100)
    plt.close(figure)
    report = f"""# fifa-hf demo: which pairs does each method keep?

Synthetic Pick-a-Pic with {args.num_pairs} pairs (seed {args.seed}, label temperature {args.label_temperature});
every method keeps the same K = {result.report.selected} pairs. The proxy reward is a **simulation**
(true reward + N(0, {args.proxy_noise}²)), prompt quality the offline **heuristic** (not an LLM), diversity
all-MiniLM-L6-v2 k-NN entropy (k = {result.config.knn_k}). FiFA weights: alpha = {args.alpha}, gamma = {args.gamma}.

{markdown_table(frame)}

- *label agreement with truth*: fraction of kept pairs whose human label agrees with the true reward (ties 0.5);
- *true reward gap*: mean true reward of chosen minus rejected;
- *junk or unsafe prompts*: fraction of kept pairs whose prompt is junk or unsafe;
- *distinct prompts*: prompts covered by the kept pairs.

![metrics](selection_metrics.png)

Row accounting: {result.report.rows_in} rows in, {result.report.rows_kept} scored, dropped {result.report.dropped}.
The FiFA subset is in `subset/` (dataset card, histogram, scores). Took {seconds:.1f} s.
"""
    (output_dir / "report.md").write_text(report)
