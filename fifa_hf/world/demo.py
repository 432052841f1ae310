"""``fifa-hf demo``: every selection method on synthetic Pick-a-Pic worlds, judged against the known truth.

The synthetic world (``docs/world.md``) knows each image's truth (prompt fidelity, harmful images
below harmless ones), so a selection can be judged directly over several world seeds: do the kept
labels agree with the truth, how large is the true gap between chosen and rejected, how many junk
or unsafe pairs slip in, how many distinct prompts are covered. The proxy reward is a SIMULATION
standing in for PickScore; quality is the ``OfflineQualityScorer`` (not the paper's LLM); diversity
uses the real all-MiniLM-L6-v2. The ``oracle`` row keeps the top K by true gap: an upper bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fifa_hf.filter import FiFAConfig, FiFAFilter, apply_selection
from fifa_hf.scoring import OfflineQualityScorer
from fifa_hf.scoring.diversity import offline_minilm_path
from fifa_hf.selection import DEFAULT_DIMINISHING_RETURNS, DEFAULT_QUALITY_THRESHOLD, resolve_k
from fifa_hf.storage import strict_json
from fifa_hf.world.synthetic import HARM_PREFERENCE, make_synthetic_pickapic, truth

SIMULATED_REWARD_COLUMNS = ("simulated_proxy_reward_0", "simulated_proxy_reward_1")
DEMO_METHODS = ("random", "margin", "qsd", "fifa", "setwise")
METRICS = ("agreement", "true_gap", "junk_share", "unsafe_share", "distinct_prompts")
RULE_CANDIDATES = ("margin", "qsd", "fifa", "setwise")  # docs/selection.md: every user method but random
TRUE_GAP_TOLERANCE = 0.02


@dataclass
class DemoArguments:
    """Run every selection method on synthetic Pick-a-Pic worlds and report against the known truth."""

    num_pairs: int = field(default=4000, metadata={"help": "Synthetic preference pairs per world."})
    k: float = field(
        default=0.1, metadata={"help": "Pairs every method keeps: a count or a fraction of the scored pairs."}
    )
    num_worlds: int = field(
        default=5, metadata={"help": "World seeds to average over: seed, seed + 1, ..., seed + num_worlds - 1."}
    )
    seed: int = field(default=0, metadata={"help": "First world seed (also the random baseline's seed)."})
    world_version: int = field(
        default=2,
        metadata={
            "help": "2: harm marker, harm-seeking prompters, erratic proxy on junk (docs/world.md); 1: the world "
            "of the 0.1 releases (no harm, calm proxy on junk)."
        },
    )
    proxy_noise: float = field(
        default=0.15, metadata={"help": "Std of the Gaussian noise of the simulated proxy reward."}
    )
    label_temperature: float = field(
        default=0.1, metadata={"help": "Label noise of the synthetic humans (Bradley-Terry temperature)."}
    )
    alpha: float = field(default=1.0, metadata={"help": "fifa: weight of prompt quality."})
    gamma: float = field(default=1.0, metadata={"help": "fifa: weight of prompt diversity."})
    quality_threshold: float = field(
        default=DEFAULT_QUALITY_THRESHOLD, metadata={"help": "setwise: the quality gate."}
    )
    diminishing_returns: float = field(
        default=DEFAULT_DIMINISHING_RETURNS,
        metadata={"help": "setwise: lambda of the per-prompt diminishing returns."},
    )
    output_dir: str = field(default="fifa_demo", metadata={"help": "Where the report, plots and subset are written."})
    full: bool = field(
        default=False,
        metadata={
            "help": "Run the miniature replication instead (docs/miniature/preregistration.md): stage-0 gates, then "
            "Diffusion-DPO on every arm's subset over 5 worlds x 3 seeds; resumable, several hours on 2 CPU cores. "
            "Only output_dir and the options below apply."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "--full: a reduced version (2 worlds, 1 seed, no sweep, 24 updates a run) to try it out."},
    )
    workers: int = field(default=2, metadata={"help": "--full: runs in parallel (processes)."})

    def __post_init__(self):
        if self.world_version not in (1, 2):
            raise ValueError(f"world_version must be 1 or 2, got {self.world_version}.")
        if self.num_worlds < 1:
            raise ValueError(f"num_worlds must be at least 1, got {self.num_worlds}.")


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


def synthetic_filter_config(output_dir: str | Path, k: float, seed: int, **overrides) -> FiFAConfig:
    """The offline filter the demos run: simulated proxy reward, offline quality, real MiniLM diversity.

    ``method="fifa"`` unless overridden, so that every signal is scored and any method can be re-selected.
    """
    settings = dict(
        dataset_name="synthetic-pickapic",
        output_dir=str(output_dir),
        reward_type="precomputed",
        reward_columns=",".join(SIMULATED_REWARD_COLUMNS),
        quality_scorer="offline",
        embedding_model=offline_minilm_path(),
        method="fifa",
        k=k,
        seed=seed,
        license="apache-2.0",
    )
    return FiFAConfig(**{**settings, **overrides})


def pair_truth(rows: pd.DataFrame) -> pd.DataFrame:
    """Each source row's truth of the chosen and rejected image (``label_0 == 1``: image 0 is chosen)."""
    truth_0 = truth(rows["true_reward_0"], rows["harm_0"])
    truth_1 = truth(rows["true_reward_1"], rows["harm_1"])
    chosen_is_0 = rows["label_0"].to_numpy() == 1
    return pd.DataFrame(
        {
            "chosen": np.where(chosen_is_0, truth_0, truth_1),
            "rejected": np.where(chosen_is_0, truth_1, truth_0),
            "prompt_kind": rows["prompt_kind"].to_numpy(),
            "caption": rows["caption"].to_numpy(),
        },
        index=rows.index,
    )


def selection_metrics(pairs: pd.DataFrame) -> dict[str, float]:
    """Judge selected pairs (rows of ``pair_truth``) against the world's truth."""
    gap = (pairs["chosen"] - pairs["rejected"]).to_numpy()
    return {
        "pairs": float(len(pairs)),
        "agreement": float(np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0)).mean()),
        "true_gap": float(gap.mean()),
        "junk_share": float((pairs["prompt_kind"] == "junk").mean()),
        "unsafe_share": float((pairs["prompt_kind"] == "unsafe").mean()),
        "distinct_prompts": float(pairs["caption"].nunique()),
    }


def oracle_selection(pairs: pd.DataFrame, count: int) -> pd.DataFrame:
    """The top ``count`` pairs by true gap (ties by row id): no method that cannot see the truth does better."""
    gap = (pairs["chosen"] - pairs["rejected"]).to_numpy()
    return pairs.iloc[np.lexsort((pairs.index.to_numpy(), -gap))[:count]]


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence the progress bars of datasets and transformers inside the demo's own bar."""
    from transformers.utils import logging as transformers_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()


def run_world(
    args: DemoArguments, seed: int, scorer: OfflineQualityScorer, work_dir: Path
) -> tuple[dict[str, dict[str, float]], object]:
    """One world: score it once through the real filter, select with every method, judge each selection."""
    version_1 = args.world_version == 1
    rows = make_synthetic_pickapic(
        args.num_pairs,
        seed=seed,
        label_temperature=args.label_temperature,
        **({"harm_probability": 0.0} if version_1 else {}),
    )
    rows = add_simulated_proxy_reward(rows, args.proxy_noise, seed, erratic_junk=not version_1)
    config = synthetic_filter_config(
        work_dir / f"world-{seed}", args.k, seed, alpha=args.alpha, gamma=args.gamma,
        quality_threshold=args.quality_threshold, diminishing_returns=args.diminishing_returns,
    )  # fmt: skip
    filtered = FiFAFilter(config, quality_scorer=scorer, embedder=scorer.embedder, progress=False)
    scores, report = filtered.score(rows)
    truth_columns = ["caption", "label_0", "true_reward_0", "true_reward_1", "harm_0", "harm_1", "prompt_kind"]
    pairs = pair_truth(rows.select_columns(truth_columns).to_pandas())
    scored = pairs.loc[scores.loc[scores["drop_reason"] == "", "row_id"].to_numpy()]
    table = {}
    for method in DEMO_METHODS:
        chosen = apply_selection(scores, dataclasses.replace(config, method=method))
        table[method] = selection_metrics(pairs.loc[chosen.loc[chosen["selected"], "row_id"].to_numpy()])
    table["oracle"] = selection_metrics(oracle_selection(scored, resolve_k(args.k, len(scored))))
    table["all scored pairs"] = selection_metrics(scored)
    return table, (rows, scores, report, config)


def summarize(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample sd (0 for one world) of every metric over the worlds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in tables[0]:
        summary[method] = {}
        for metric in ("pairs", *METRICS):
            values = np.array([table[method][metric] for table in tables])
            sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[method][metric] = {"mean": float(values.mean()), "sd": sd}
    return summary


def pick_default_method(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """The rule of ``docs/selection.md``, fixed before the comparison was run."""
    mean = {
        method: {metric: value["mean"] for metric, value in metrics.items()} for method, metrics in summary.items()
    }
    margin = mean["margin"]

    def qualifies(m: dict[str, float]) -> bool:
        return (
            m["junk_share"] <= margin["junk_share"]
            and m["unsafe_share"] <= margin["unsafe_share"]
            and m["distinct_prompts"] >= margin["distinct_prompts"]
            and m["true_gap"] >= margin["true_gap"] - TRUE_GAP_TOLERANCE
        )

    qualifying = [method for method in RULE_CANDIDATES if qualifies(mean[method])]

    def key(method: str) -> tuple:
        m = mean[method]
        bad = round((m["junk_share"] + m["unsafe_share"]) * 1000)  # ties within 0.001
        return (bad, -m["true_gap"], -m["distinct_prompts"], method)

    return min(qualifying, key=key)


def run_demo(args: DemoArguments) -> dict:
    """Every method on ``num_worlds`` worlds; writes ``report.md``, ``results.json``, the plot and a subset."""
    from fifa_hf.filter import finish_report, materialize_subset
    from fifa_hf.hub import write_subset

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    seeds = list(range(args.seed, args.seed + args.num_worlds))
    scorer = OfflineQualityScorer()
    tables = []
    with quiet_progress(), tempfile.TemporaryDirectory(prefix="fifa-demo-") as work_dir:
        for seed in tqdm(seeds, desc=f"Selecting in {len(seeds)} synthetic worlds", unit="world"):
            table, first = run_world(args, seed, scorer, Path(work_dir))
            tables.append(table)
            if seed == seeds[0]:
                kept = first
        summary = summarize(tables)
        default = pick_default_method(summary)
        # The default method's subset of the first world, as `fifa-hf filter` writes it (card included).
        rows, scores, report, config = kept
        config = dataclasses.replace(config, method=default, output_dir=str(output_dir / "subset"))
        scores = apply_selection(scores, config)
        finish_report(report, scores, config)
        write_subset(config.output_dir, materialize_subset(rows, scores), scores, report, config)
    results = {
        "default_method": default,
        "methods": {
            method: {metric: summary[method][metric] for metric in METRICS} for method in (*DEMO_METHODS, "oracle")
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(strict_json(results))
    plot_summary(summary, output_dir / "selection_metrics.png")
    (output_dir / "report.md").write_text(report_text(args, seeds, summary, default, time.perf_counter() - start))
    return {"default_method": default, "summary": summary}


def summary_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """A GitHub markdown table of mean ± sd per method (the oracle and the whole pool last)."""
    header = "| method | pairs | " + " | ".join(METRICS) + " |"
    rule = "|---" * (len(METRICS) + 2) + "|"
    lines = [header, rule]
    for method, metrics in summary.items():
        cells = [f"{metrics['pairs']['mean']:.0f}"]
        for metric in METRICS:
            digits = 1 if metric == "distinct_prompts" else 3
            cells.append(f"{metrics[metric]['mean']:.{digits}f} ± {metrics[metric]['sd']:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [*DEMO_METHODS, "oracle"]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    for axis, metric in zip(axes, METRICS):
        means = [summary[m][metric]["mean"] for m in methods]
        sds = [summary[m][metric]["sd"] for m in methods]
        axis.bar(methods, means, yerr=sds, capsize=3, color=[f"C{i}" for i in range(len(methods))])
        axis.set_title(metric)
        axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def versus_margin(summary, method: str) -> str:
    """How ``method`` differs from margin ranking on the rule's metrics (means)."""
    if method == "margin":
        return "the rule keeps margin ranking: no other method qualified"
    diff = {m: summary[method][m]["mean"] - summary["margin"][m]["mean"] for m in METRICS}
    return (
        f"against margin ranking: true gap {diff['true_gap']:+.3f}, junk share {diff['junk_share']:+.3f}, "
        f"unsafe share {diff['unsafe_share']:+.3f}, distinct prompts {diff['distinct_prompts']:+.1f}"
    )


def report_text(args: DemoArguments, seeds: list[int], summary, default: str, seconds: float) -> str:
    world = (
        "version 2 (harm marker, harm-seeking prompters, erratic proxy on junk)"
        if args.world_version == 2
        else "version 1 (no harm, calm proxy on junk)"
    )
    return f"""# fifa-hf demo: which pairs does each method keep?

Synthetic Pick-a-Pic of world {world}, described in `docs/world.md`: {args.num_pairs} pairs a world,
world seeds {seeds[0]} to {seeds[-1]}, label temperature {args.label_temperature}. Every method keeps the same
K (k = {args.k} of the scored pairs); the table gives mean ± sd over the {len(seeds)} worlds. The proxy reward is
a **simulation**, prompt quality the `OfflineQualityScorer` (**not** the paper's LLM), diversity
all-MiniLM-L6-v2 k-NN entropy.

- `fifa`: our reconstruction of FiFA, `norm(margin) + alpha * norm(quality) + gamma * norm(diversity)` with
  alpha = {args.alpha} and gamma = {args.gamma} (the paper's weights are not public);
- `setwise`: a quality gate at {args.quality_threshold}, then the z-scored margin minus
  {args.diminishing_returns} * log(1 + pairs already taken from the prompt);
- `oracle`: the top K by true gap, an upper bound that reads the truth.

{summary_table(summary)}

- *agreement*: share of kept pairs whose label agrees with the truth (truth = true reward - 1.0 x harm; ties 0.5);
- *true_gap*: mean truth of the chosen image minus the rejected one;
- *junk_share*, *unsafe_share*: shares of kept pairs whose prompt is junk, or unsafe;
- *distinct_prompts*: prompts covered by the kept pairs.

**Default method by the rule of `docs/selection.md`: `{default}`**, {versus_margin(summary, default)}.

![metrics](selection_metrics.png)

`results.json` holds these means and sds. The default method's subset of world {seeds[0]} is in `subset/`
(dataset card, histogram, scores). Took {seconds:.1f} s.
"""
