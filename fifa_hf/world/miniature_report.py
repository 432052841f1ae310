"""The miniature replication's markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _verdict(summary: dict[str, dict[str, Any]]) -> str:
    """A plain statement of how FiFA's final reward compares with the other arms, given the seed spread."""
    if "fifa" not in summary:
        return ""
    fifa = summary["fifa"]
    lines = []
    for arm, entry in summary.items():
        if arm == "fifa":
            continue
        difference = fifa["final_mean"] - entry["final_mean"]
        spread = fifa["final_std"] + entry["final_std"]
        if abs(difference) <= spread:
            relation = "within the seed spread of"
        else:
            relation = "above" if difference > 0 else "below"
        lines.append(
            f"- FiFA's final true reward ({fifa['final_mean']:.3f}) is {relation} {arm}'s ({entry['final_mean']:.3f}); "
            f"difference {difference:+.3f}, summed seed std {spread:.3f}."
        )
    return "\n".join(lines)


def write_report(output_dir: Path, results: dict[str, Any]) -> None:
    args, summary = results["arguments"], results["summary"]
    rows = [
        "| arm | training pairs | junk/unsafe share | final true reward (mean ± std) | images seen | wall s / run "
        "| first step reaching full's final |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, entry in summary.items():
        reach = entry.get("first_step_reaching_full_final")
        rows.append(
            f"| {arm} | {entry['train_pairs']} | {results['subset_junk_or_unsafe'][arm]:.3f} "
            f"| {entry['final_mean']:.3f} ± {entry['final_std']:.3f} | {entry['images_seen']} "
            f"| {entry['wall_seconds']:.1f} | {'never' if reach is None else reach} |"
        )
    curve_rows = ["| step | " + " | ".join(summary) + " |", "|---" * (len(summary) + 1) + "|"]
    steps = next(iter(summary.values()))["steps"]
    for i, step in enumerate(steps):
        cells = [f"{summary[arm]['mean'][i]:.3f} ± {summary[arm]['std'][i]:.3f}" for arm in summary]
        curve_rows.append(f"| {step} | " + " | ".join(cells) + " |")
    text = f"""# Miniature FiFA replication: Diffusion-DPO on the synthetic world

Every arm starts from the same pre-trained world model (`{results["model"]}`) and runs Diffusion-DPO
(full UNet, beta {args["beta"]}, AdamW lr {args["learning_rate"]}, batch {args["batch_size"]} pairs,
{args["train_steps"]} steps) for seeds {args["seeds"]}. Every {args["eval_steps"]} steps,
{args["eval_prompts"]} held-out prompts are sampled with fixed seeds ({args["sampling_steps"]} DDIM steps,
guidance {args["guidance_scale"]}) and scored with the world's **true reward** read from pixels (the
fraction of count, colour, shape, background and style that the image shows).

Data: {args["num_pairs"]} synthetic Pick-a-Pic pairs (label temperature {args["label_temperature"]}); FiFA, QSD
and random keep the same K ({args["subset_fraction"]:.0%}) through `FiFAFilter` (simulated proxy reward =
truth + N(0, {args["proxy_noise"]}²), heuristic prompt quality, MiniLM diversity); *full* trains on every
usable pair. Budgets were fixed before any outcome was seen.

{chr(10).join(rows)}

![reward vs step](reward_curve.png)

Mean ± std over seeds at every evaluation:

{chr(10).join(curve_rows)}

{_verdict(summary)}

Samples on held-out prompts after training (first seed), one column per arm:

![samples](samples.png)

Total time: {results["total_seconds"]:.0f} s.
"""
    (output_dir / "report.md").write_text(text)
