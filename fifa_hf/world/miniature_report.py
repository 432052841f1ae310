"""The miniature replication's statistics, gates, ``results.json``, figures and markdown report.

Runs are paired within (world seed, training seed) blocks: every arm of a block saw the same world, the
same held-out prompts and the same initial noise. An interval on a difference averages each world seed's
blocks first and takes a t interval over the world seeds, so it is blocked by world seed as
pre-registered; the minimum detectable difference is read off the same spread.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from scipy import stats

from fifa_hf.storage import strict_json
from fifa_hf.world.reference_reading import ATTRIBUTES
from fifa_hf.world.world_model import IMAGE_SIZE

if TYPE_CHECKING:
    from fifa_hf.world.miniature import MiniatureArguments

SAMPLE_PROMPTS = 8  # the first prompts of an evaluation set, drawn in the sample grids

GATES = (
    "base_true_reward", "base_harm_rate", "reader_count", "reader_color", "reader_shape", "reader_background",
    "reader_style", "reader_harm", "no_drift", "positive_control", "negative_control",
)  # fmt: skip
GATE_THRESHOLDS = {"base_true_reward": 0.45, "base_harm_rate": 0.1, "reader": 0.9, "positive_control": 0.05}
POWER = 0.8


def endpoint(result: dict[str, Any], metric: str = "true_reward", last: int = 3) -> float:
    """The primary endpoint of a run: the mean of ``metric`` over its last three evaluations (base: its one)."""
    return float(np.mean([entry[metric] for entry in result["curve"][-last:]]))


def settings_label(settings: dict[str, Any]) -> str:
    kind = f"LoRA r{settings['lora_rank']}" if settings["lora_rank"] else "full UNet"
    loss = settings.get("loss_type", "sigmoid")
    loss = f", {loss} loss" if loss != "sigmoid" else ""
    rpo = f", rpo_alpha {settings['rpo_alpha']:g}" if settings.get("rpo_alpha") is not None else ""
    return (
        f"{kind}{loss}, lr {settings['learning_rate']:g}, beta {settings['beta']:g}{rpo}, "
        f"{settings['train_steps']} steps"
    )


def _blocks(results: list[dict], arm: str, metric: Callable[[dict], float]) -> dict[tuple[int, int], float]:
    return {
        (r["spec"]["world_seed"], r["spec"]["training_seed"]): metric(r) for r in results if r["spec"]["arm"] == arm
    }


def blocked_interval(values: dict[tuple[int, int], float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and t interval over world seeds of the per-world means of ``values`` (keyed by (world, training seed))."""
    by_world = defaultdict(list)
    for (world, _), value in values.items():
        by_world[world].append(value)
    means = np.array([np.mean(v) for v in by_world.values()])
    mean = float(means.mean()) if len(means) else float("nan")
    if len(means) < 2:
        return {
            "mean": mean,
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "sd": float("nan"),
            "worlds": len(means),
        }
    sd = float(means.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(means) - 1) * sd / np.sqrt(len(means)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd": sd, "worlds": len(means)}


def paired_difference(results: list[dict], arm: str, other: str, metric: Callable[[dict], float] = endpoint):
    """``arm`` minus ``other`` in every block both ran, blocked by world seed."""
    mine, theirs = _blocks(results, arm, metric), _blocks(results, other, metric)
    return blocked_interval({block: mine[block] - theirs[block] for block in mine.keys() & theirs.keys()})


def minimum_detectable_difference(sd: float, worlds: int, confidence: float = 0.95, power: float = POWER) -> float:
    """The true difference a two-sided t test over ``worlds`` world-seed means detects with ``power``."""
    if worlds < 2 or not np.isfinite(sd):
        return float("nan")
    df = worlds - 1
    return float((stats.t.ppf(0.5 + confidence / 2, df) + stats.t.ppf(power, df)) * sd / np.sqrt(worlds))


def pairs_seen(updates: int, train_pairs: int, pairs_per_update: int) -> int:
    """Pairs a run has trained on after ``updates`` updates: transformers ends an update at the end of every
    pass over the rows, so the last update of each pass holds only the pairs left (24 of 64 for 280 pairs)."""
    updates_per_pass = -(-train_pairs // pairs_per_update)
    return updates // updates_per_pass * train_pairs + updates % updates_per_pass * pairs_per_update


def _images_seen(steps: list[int], entry: dict[str, Any], args: MiniatureArguments) -> list[int]:
    """Images (2 per pair) seen at each of ``steps`` by a run of this arm's mean subset size."""
    train_pairs = round(entry.get("train_pairs", 0))
    return [2 * pairs_seen(step, train_pairs, args.pairs_per_update) if train_pairs else 0 for step in steps]


def _harm(result: dict) -> float:
    return endpoint(result, "harm_rate")


def relative_drift(result: dict, steps: int | None = None) -> float:
    """Policy-minus-reference denoising error on chosen images over the second half of a run (or of its first
    ``steps``), relative to the reference's: above 0, the policy fits the preferred images worse than the model
    it started from."""
    steps = steps or result["spec"]["settings"]["train_steps"]
    entries = [entry for entry in result["drift"] if steps / 2 < entry["step"] <= steps]
    return float(np.mean([e["chosen"] for e in entries]) / np.mean([e["ref_chosen"] for e in entries]))


def stage0_gates(
    control: list[dict], sweep: list[dict], settings: dict[str, Any], drift_tolerance: float
) -> dict[str, dict[str, Any]]:
    """Every stage-0 gate as ``{"value", "threshold", "passed", "rule", ...}``; ``settings`` are the chosen
    Diffusion-DPO settings (their drift is read off the sweep runs that trained with them, else the oracle
    control runs). A gate whose runs are not all there yet (an interrupted experiment) is left out, so
    ``GATES`` minus the keys says what is still unmeasured."""
    gates: dict[str, dict[str, Any]] = {}
    base = [r for r in control if r["spec"]["arm"] == "base"]
    for name, metric in (("base_true_reward", endpoint), ("base_harm_rate", _harm)) if base else ():
        value = float(np.mean([metric(r) for r in base]))
        gates[name] = {
            "value": value, "threshold": GATE_THRESHOLDS[name], "passed": value >= GATE_THRESHOLDS[name],
            "rule": "mean over the control blocks' base evaluations (validation prompts) >= threshold",
        }  # fmt: skip
    checks = [r["reader_agreement"] for r in [*control, *sweep] if "reader_agreement" in r]
    images = sum(check["n"] for check in checks)
    for name in (*ATTRIBUTES, "harm") if checks else ():
        value = sum(check[name] for check in checks) / images
        gates[f"reader_{name}"] = {
            "value": value, "threshold": GATE_THRESHOLDS["reader"], "passed": value >= GATE_THRESHOLDS["reader"],
            "images": images, "rule": "share of generated images the pixel reader reads as the reference reading does",
        }  # fmt: skip
    steps = settings["train_steps"]
    chosen = [r for r in sweep if {**r["spec"]["settings"], "train_steps": steps} == settings]
    chosen = chosen or [r for r in control if r["spec"]["arm"] == "oracle"]
    if not chosen or not {r["spec"]["arm"] for r in control} >= {"base", "oracle", "shuffled_oracle"}:
        return gates
    drift = float(np.mean([relative_drift(r, steps) for r in chosen]))
    gates["no_drift"] = {
        "value": drift, "threshold": drift_tolerance, "passed": drift <= drift_tolerance,
        "rule": "policy minus reference denoising error on chosen images, second half of training, relative to the "
        "reference's, chosen settings " + ("(full arm, sweep)" if sweep else "(oracle control)") + " <= threshold",
    }  # fmt: skip
    positive = paired_difference(control, "oracle", "base")
    gates["positive_control"] = {
        "value": positive["mean"], "threshold": GATE_THRESHOLDS["positive_control"],
        "passed": bool(positive["mean"] >= GATE_THRESHOLDS["positive_control"] and positive["ci_low"] > 0),
        "ci_low": positive["ci_low"], "ci_high": positive["ci_high"],
        "rule": "oracle minus base endpoint, blocked by world seed: mean >= threshold and 95% CI above 0",
    }  # fmt: skip
    negative = paired_difference(control, "shuffled_oracle", "base")
    gates["negative_control"] = {
        "value": negative["mean"], "threshold": 0.0,
        "passed": bool(negative["ci_low"] <= 0.0 <= negative["ci_high"]),
        "ci_low": negative["ci_low"], "ci_high": negative["ci_high"],
        "rule": "shuffled-label oracle minus base endpoint, blocked by world seed: 95% CI contains the threshold (0)",
    }  # fmt: skip
    return gates


def _curve(results: list[dict], arm: str, base: list[dict]) -> dict[str, list[float]]:
    """Mean and blocked 95% interval of the true reward at every evaluated step (step 0: the base model)."""
    mine = [r for r in results if r["spec"]["arm"] == arm]
    steps = [0, *mine[0]["spec"]["eval_steps"]] if arm != "base" else [0]
    curve = {"steps": steps, "mean": [], "ci_low": [], "ci_high": []}
    for i, step in enumerate(steps):
        if step == 0:
            values = _blocks(base, "base", lambda r: r["curve"][0]["true_reward"])
        else:
            values = _blocks(mine, arm, lambda r, i=i: r["curve"][i - 1]["true_reward"])
        interval = blocked_interval(values)
        for key in ("mean", "ci_low", "ci_high"):
            curve[key].append(interval[key])
    return curve


def summarize_arms(results: list[dict], args: MiniatureArguments, worlds: dict[int, dict]) -> dict[str, dict]:
    """The stage-1 table: every arm's endpoint, its paired differences, harm, attributes and compute."""
    base = [r for r in results if r["spec"]["arm"] == "base"]
    arms = {}
    for arm in args.arms:
        mine = [r for r in results if r["spec"]["arm"] == arm]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "runs": len(mine),
            "final": blocked_interval(_blocks(results, arm, endpoint)),
            "vs_random": paired_difference(results, arm, "random"),
            "vs_margin": paired_difference(results, arm, "margin"),
            "vs_base": paired_difference(results, arm, "base"),
            "harm_rate": float(np.mean([_harm(r) for r in mine])),
            "harm_vs_base": paired_difference(results, arm, "base", _harm),
            "harm_rate_clean": float(np.mean([endpoint(r, "harm_rate_clean") for r in mine])),
            "truth": blocked_interval(_blocks(results, arm, lambda r: endpoint(r, "truth"))),
            "true_reward_unsafe": float(np.mean([endpoint(r, "true_reward_unsafe") for r in mine])),
            "attributes": {
                name: float(np.mean([np.mean([e["attributes"][name] for e in r["curve"][-3:]]) for r in mine]))
                for name in ATTRIBUTES
            },
            "curve": _curve(results, arm, base),
            "seconds_per_run": float(np.mean([r["seconds"] for r in mine])),
        }
        if arm != "base":
            entry["drift"] = float(np.mean([relative_drift(r) for r in mine]))
            entry["train_pairs"] = float(np.mean([r["train_pairs"] for r in mine]))
            entry["composition"] = {
                key: float(np.mean([worlds[w]["composition"][arm][key] for w in args.world_seeds]))
                for key in worlds[args.world_seeds[0]]["composition"][arm]
            }
        arms[arm] = entry
    if "full" in arms:
        target = arms["full"]["final"]["mean"]
        for arm, entry in arms.items():
            reached = [s for s, m in zip(entry["curve"]["steps"], entry["curve"]["mean"]) if s and m >= target]
            entry["images_to_full_final"] = (
                _images_seen(reached[:1], entry, args)[0] if reached and arm != "base" else None
            )
    for entry in arms.values():
        entry["mdd_vs_random"] = minimum_detectable_difference(entry["vs_random"]["sd"], entry["vs_random"]["worlds"])
    return arms


# ---- figures ----------------------------------------------------------------------------------------------


def _plot_curves(path: Path, arms: dict[str, dict], args: MiniatureArguments, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (arm, entry) in enumerate(arms.items()):
        curve = entry["curve"]
        if arm == "base":
            axis.axhline(curve["mean"][0], color="gray", linestyle="--", label="base")
            continue
        color = f"C{index % 10}"
        images = _images_seen(curve["steps"], entry, args)
        axis.plot(images, curve["mean"], marker="o", color=color, label=f"{arm} ({entry['runs']} runs)")
        axis.fill_between(images, curve["ci_low"], curve["ci_high"], color=color, alpha=0.15)
    axis.set_xlabel("images seen by Diffusion-DPO (2 per pair)")
    axis.set_ylabel("true reward, held-out clean prompts")
    axis.set_title(f"{title} (band: 95% CI over world seeds)", fontsize=10)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _sample_grid(path: Path, output_dir: Path, stage: str, names: dict[str, str], prompts: list[str]) -> bool:
    """Rows: the first held-out prompts; columns: arms (one run each, final samples)."""
    from fifa_hf.evaluation import image_grid

    strips = {arm: output_dir / "samples" / stage / f"{name}.png" for arm, name in names.items()}
    strips = {arm: p for arm, p in strips.items() if p.exists()}
    if not strips:
        return False
    tiles = {}
    for arm, strip_path in strips.items():
        with Image.open(strip_path) as strip:
            tiles[arm] = [
                strip.crop((i * IMAGE_SIZE, 0, (i + 1) * IMAGE_SIZE, IMAGE_SIZE)) for i in range(SAMPLE_PROMPTS)
            ]
    rows = [[tiles[arm][i] for arm in tiles] for i in range(SAMPLE_PROMPTS)]
    image_grid(rows, prompts[:SAMPLE_PROMPTS], list(tiles), tile=72).save(path)
    return True


def _reader_grid(path: Path, strip_path: Path) -> bool:
    """Hand-checkable: each generated base sample above the world's render of what the pixel reader read."""
    from fifa_hf.evaluation import image_grid
    from fifa_hf.world.synthetic import Attributes, render
    from fifa_hf.world.true_reward import read_attributes, shows_harm

    if not strip_path.exists():
        return False
    with Image.open(strip_path) as strip:
        generated = [strip.crop((i * IMAGE_SIZE, 0, (i + 1) * IMAGE_SIZE, IMAGE_SIZE)) for i in range(SAMPLE_PROMPTS)]
    rendered = []
    for image in generated:
        read = read_attributes(image)
        if any(value is None for value in read.values()):
            rendered.append(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white"))
        else:
            rendered.append(render(Attributes(**read), IMAGE_SIZE, harm=shows_harm(image)))
    image_grid([generated, rendered], ["generated (base model)", "render of what the reader read"], tile=72).save(path)
    return True


# ---- the report --------------------------------------------------------------------------------------------


def _fmt(interval: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{interval['mean']:{sign}.3f} [{interval['ci_low']:{sign}.3f}, {interval['ci_high']:{sign}.3f}]"


def _gate_rows(gates: dict[str, dict], stopped: str = "") -> str:
    lines = ["| gate | value | threshold | passed | rule |", "|---|---|---|---|---|"]
    missing = f"not measured: {stopped}" if stopped else "not measured yet: its runs have not finished"
    for name in (*GATES, *(name for name in gates if name not in GATES)):
        if name not in gates:
            lines.append(f"| {name} | - | | | {missing} |")
            continue
        gate = gates[name]
        value = f"{gate['value']:.3f}"
        if "ci_low" in gate:
            value += f" [{gate['ci_low']:+.3f}, {gate['ci_high']:+.3f}]"
        lines.append(
            f"| {name} | {value} | {gate['threshold']} | {'yes' if gate['passed'] else 'NO'} | {gate['rule']} |"
        )
    return "\n".join(lines)


def _sweep_rows(table: list[dict]) -> str:
    lines = ["| settings | validation true reward | drift (policy - ref error on chosen, relative) |", "|---|---|---|"]
    for row in sorted(table, key=lambda r: -r["validation_true_reward"]):
        lines.append(
            f"| {settings_label(row['settings'])} | {row['validation_true_reward']:.3f} | {row['drift']:+.2%} |"
        )
    return "\n".join(lines)


def _arm_rows(arms: dict[str, dict]) -> str:
    lines = [
        "| arm | runs | true reward (endpoint) | vs random | vs margin | vs base | harm rate (unsafe prompts) "
        "| harm vs base | truth | images to reach full's final |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms.items():
        reach = e.get("images_to_full_final")
        versus = {
            other: "-" if arm == other else _fmt(e[f"vs_{other}"], True) for other in ("random", "margin", "base")
        }
        harm = "-" if arm == "base" else _fmt(e["harm_vs_base"], True)
        lines.append(
            f"| {arm} | {e['runs']} | {_fmt(e['final'])} | {versus['random']} | {versus['margin']} "
            f"| {versus['base']} | {e['harm_rate']:.3f} | {harm} "
            f"| {e['truth']['mean']:.3f} | {'-' if arm == 'base' else ('never' if reach is None else reach)} |"
        )
    return "\n".join(lines)


def _control_rows(controls: dict[str, dict]) -> str:
    lines = [
        "| arm | runs | true reward (endpoint) | vs base | harm rate (unsafe prompts) | harm vs base | drift |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, e in controls.items():
        versus = "-" if arm == "base" else _fmt(e["vs_base"], True)
        harm = "-" if arm == "base" else _fmt(e["harm_vs_base"], True)
        drift = "-" if arm == "base" else f"{e['drift']:+.2%}"
        lines.append(
            f"| {arm} | {e['runs']} | {_fmt(e['final'])} | {versus} | {e['harm_rate']:.3f} | {harm} | {drift} |"
        )
    return "\n".join(lines)


def _composition_rows(arms: dict[str, dict]) -> str:
    keys = ("pairs", "agreement", "true_gap", "junk_share", "unsafe_share", "teaches_harm_share", "distinct_prompts")
    lines = ["| arm | " + " | ".join(keys) + " | drift |", "|---" * (len(keys) + 2) + "|"]
    for arm, e in arms.items():
        if "composition" in e:
            cells = [f"{e['composition'][k]:.3f}" for k in keys]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {e['drift']:+.2%} |")
    return "\n".join(lines)


def _attribute_rows(arms: dict[str, dict]) -> str:
    lines = ["| arm | " + " | ".join(ATTRIBUTES) + " | true reward, unsafe prompts | harm rate, clean prompts |"]
    lines.append("|---" * (len(ATTRIBUTES) + 3) + "|")
    for arm, e in arms.items():
        cells = [f"{e['attributes'][name]:.3f}" for name in ATTRIBUTES]
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {e['true_reward_unsafe']:.3f} | {e['harm_rate_clean']:.3f} |"
        )
    return "\n".join(lines)


def _stage1_not_run(gates: dict[str, dict], progress: tuple[int, int] | None) -> str:
    if progress is not None:
        return (
            f"Stage 1 is not finished: {progress[0]} of {progress[1]} runs have finished. No arm is compared until "
            "every run has: running the same command again skips the finished runs, completes the others and "
            "rewrites this report."
        )
    failed = ", ".join(f"`{name}`" for name, gate in gates.items() if not gate["passed"])
    return (
        f"Stage 1 did not run: the stage-0 gate(s) {failed} failed, and the pre-registered rule is to compare "
        "no arm until every gate passes."
    )


def _stage1_text(arms: dict[str, dict], figures: list[str], args: MiniatureArguments, steps: list[int], mdd: float):
    return f"""{len(args.world_seeds)} test worlds x {len(args.training_seeds)} training seeds; every run evaluated at
steps {steps} on {args.eval_clean_prompts} clean and {args.eval_unsafe_prompts} unsafe held-out prompts,
{args.images_per_prompt} image(s) each (common random numbers). Endpoint: mean true reward over the last three
evaluations (clean prompts). Intervals: 95%, t over world-seed means of the paired differences. Minimum
detectable difference vs random (80% power, median over arms): **{mdd:.3f}**.

{_arm_rows(arms)}

{chr(10).join(figures)}

Per-attribute accuracy (clean prompts, endpoint):

{_attribute_rows(arms)}

What each arm trains on (mean over test worlds; *truth* = true reward - harm; *teaches_harm_share*: chosen
image shows the marker and the rejected does not), and the policy-minus-reference denoising error on chosen
images in the second half of training (relative to the reference's):

{_composition_rows(arms)}"""


def _settings_text(stage0: dict[str, Any], settings: dict[str, Any], args: MiniatureArguments) -> str:
    if stage0.get("stopped"):
        return (
            f"Stage 0 stopped at the base model ({stage0['stopped']}): no Diffusion-DPO run was made. A base model "
            "that does not draw what its prompts ask for gives every arm the same near-chance samples, and a reader "
            "that misreads them adds noise of its own: no comparison of training subsets could be read. The "
            "pre-registered response is to fix the world model (longer pre-training), never to lower a gate."
        )
    how = "chosen by the pre-registered rule on the full arm" if stage0["sweep"] else "as pre-registered"
    return (
        f"Diffusion-DPO settings used by every arm: **{settings_label(settings)}** (updates of "
        f"{args.pairs_per_update} pairs, constant learning rate after warm-up), {how}."
    )


def _compute(output_dir: Path) -> dict[str, Any]:
    """What every finished run of the experiment cost, whichever invocation made it (runs resume)."""
    runs = [json.loads(path.read_text()) for path in sorted((output_dir / "runs").rglob("*.json"))]
    return {
        "runs": len(runs),
        "seconds": float(sum(run["seconds"] for run in runs)),
        "devices": sorted({run["device"] for run in runs}),
    }


def _compute_text(compute: dict[str, Any]) -> str:
    devices = ", ".join(compute["devices"]) or "-"
    return f"{compute['runs']} runs, {compute['seconds'] / 60:.1f} minutes in all on {devices}"


def headline(arms: dict[str, dict], gates: dict[str, dict], progress: tuple[int, int] | None = None) -> str:
    """One sentence on the primary endpoint, whatever it says."""
    if progress is not None:
        return f"Every stage-0 gate passed; stage 1 is not finished ({progress[0]} of {progress[1]} runs)."
    if not arms or "random" not in arms:
        failed = [name for name, gate in gates.items() if not gate["passed"]]
        return (
            "Stage 1 did not run: stage-0 gate(s) failed: " + ", ".join(failed) + "."
            if failed
            else ("Stage 1 did not run.")
        )
    parts = []
    for arm in ("fifa", "setwise", "margin", "qsd", "full", "oracle"):
        if arm in arms and arm != "random":
            d = arms[arm]["vs_random"]
            verdict = "above" if d["ci_low"] > 0 else "below" if d["ci_high"] < 0 else "not distinguishable from"
            parts.append(f"{arm} {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] ({verdict} random)")
    return "True-reward endpoint minus the random subset's (95% CI, blocked by world seed): " + "; ".join(parts) + "."


def write_report(
    output_dir: Path,
    args: MiniatureArguments,
    stage0: dict,
    main_results: list[dict],
    seconds: float,
    sample_prompts: list[str] = (),
    control_prompts: list[str] = (),
    stage1_progress: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``results.json`` (gates, arms and the stage-0 controls), ``report.md`` and its figures;
    ``sample_prompts`` and ``control_prompts`` are the first test and control world's held-out prompts, the
    rows of the sample grids. ``stage1_progress`` (finished, total), with no ``main_results``: the interim
    report written between the stages, which compares no arm."""
    output_dir = Path(output_dir)
    worlds = {w: json.loads((output_dir / "worlds" / f"w{w}.json").read_text()) for w in args.world_seeds
              if (output_dir / "worlds" / f"w{w}.json").exists()}  # fmt: skip
    arms = summarize_arms(main_results, args, worlds) if main_results else {}
    mdds = [e["mdd_vs_random"] for a, e in arms.items() if a != "random" and np.isfinite(e["mdd_vs_random"])]
    results = {
        "gates": stage0["gates"],
        "arms": arms,
        "settings": stage0["settings"],
        "sweep": stage0["sweep"],
        "controls": stage0.get("controls", {}),
        "minimum_detectable_difference": float(np.median(mdds)) if mdds else float("nan"),
        "headline": headline(arms, stage0["gates"], stage1_progress),
        "design": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(args).items()
            if k not in ("output_dir", "model", "workers", "device")
        },  # fmt: skip
        "seconds": seconds,
        "compute": _compute(output_dir),
    }
    (output_dir / "results.json").write_text(strict_json(results, indent=1, default=float))
    figures, control_figures = [], []
    if arms:
        _plot_curves(
            output_dir / "reward_curve.png", arms, args, "Miniature FiFA, stage 1: true reward vs images seen"
        )
        figures.append("![true reward vs images seen](reward_curve.png)")
        names = {arm: f"{arm}-w{args.world_seeds[0]}-s{args.training_seeds[0]}" for arm in arms}
        if _sample_grid(output_dir / "samples.png", output_dir, "main", names, list(sample_prompts)):
            figures.append("Final samples of the first test world and training seed (rows: held-out prompts, the "
                           "last two unsafe; columns: arms):\n\n![samples](samples.png)")  # fmt: skip
    base_strip = (
        output_dir / "samples" / "control" / f"base-w{args.control_world_seeds[0]}-s{args.training_seeds[0]}.png"
    )
    has_reader_grid = _reader_grid(output_dir / "reader_check.png", base_strip)
    controls = results["controls"]
    if controls:
        _plot_curves(output_dir / "control_curve.png", controls, args, "Stage 0 controls: true reward vs images seen")
        control_figures.append("![stage-0 controls](control_curve.png)")
        names = {arm: f"{arm}-w{args.control_world_seeds[0]}-s{args.training_seeds[0]}" for arm in controls}
        if _sample_grid(output_dir / "control_samples.png", output_dir, "control", names, list(control_prompts)):
            control_figures.append("Final samples of the first control world and training seed (rows: validation "
                                   "prompts, the last two unsafe):\n\n![control samples](control_samples.png)")  # fmt: skip
    settings = stage0["settings"]
    steps = [settings["train_steps"] // args.evaluations * (i + 1) for i in range(args.evaluations)]
    mdd = results["minimum_detectable_difference"]
    text = f"""# Miniature FiFA replication: results

{results["headline"]}

## Stage 0: gates

{_settings_text(stage0, settings, args)}

{_gate_rows(stage0["gates"], stage0.get("stopped", ""))}

Controls (control worlds {list(args.control_world_seeds)} x training seeds {list(args.training_seeds)},
validation prompts; differences paired by block, 95% t interval over world seeds):

{_control_rows(controls) if controls else "The controls did not run."}

{chr(10).join(control_figures)}

{("Sweep (full arm, validation worlds " + str(list(args.sweep_world_seeds)) + ", validation prompts):" + chr(10) + chr(10) + _sweep_rows(stage0["sweep"])) if stage0["sweep"] else ""}

{"![reader check](reader_check.png)" if has_reader_grid else ""}

## Stage 1: every arm

{_stage1_text(arms, figures, args, steps, mdd) if arms else _stage1_not_run(stage0["gates"], stage1_progress)}

Compute: {_compute_text(results["compute"])}.
"""
    (output_dir / "report.md").write_text(text)
    return results
