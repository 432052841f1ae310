"""Exploratory probes behind section 8 of docs/miniature/diagnosis.md: not pre-registered, validation world 200 only.

Trains the miniature's full UNet on the oracle and the shuffled-label oracle subsets of validation world 200 with
each preference loss given, and evaluates it on the validation prompts six times, beside one evaluation of the
base model. Run from the repository root (2 worker processes; about 7 minutes a loss on 2 CPU cores):

    python docs/miniature/probes/loss_probe.py 1e-4:500:300:apo_zero 1e-4:500:300:hinge

Each argument is learning rate : beta : updates : loss type (``DiffusionDPOConfig.loss_type``), and optionally
: rpo_alpha (``1e-4:500:300:sigmoid:500`` is Diffusion-DPO with RPO's term at weight 500). Results are
written as a miniature run writes them, to ``docs/miniature/probes/losses/runs/sweep/``; finished runs are
skipped.
"""

from __future__ import annotations

import sys

from fifa_hf.world.miniature import MiniatureArguments, RunSpec, TrainingSettings, run_all


def main(grid: list[str]) -> None:
    args = MiniatureArguments(output_dir="docs/miniature/probes/losses", workers=2)
    specs = [RunSpec("sweep", "base", 200, 0, "validation", None, (0,))]
    for item in grid:
        learning_rate, beta, updates, loss_type, *rpo_alpha = item.split(":")
        rpo = float(rpo_alpha[0]) if rpo_alpha else None
        settings = TrainingSettings(float(learning_rate), float(beta), 0, int(updates), rpo, loss_type)
        steps = tuple(range(int(updates) // 6, int(updates) + 1, int(updates) // 6))
        specs += [
            RunSpec("sweep", arm, 200, 0, "validation", settings, steps) for arm in ("oracle", "shuffled_oracle")
        ]
    results = run_all(specs, args, "loss probes")
    base = results[0]["curve"][0]["true_reward"]
    for result in results[1:]:
        spec, drift = result["spec"], result["drift"]
        print(
            f"{spec['arm']:>16} {spec['settings']['loss_type']:>8} rpo_alpha {spec['settings']['rpo_alpha']} "
            f"lr {spec['settings']['learning_rate']:g}: "
            f"true reward - base {[round(c['true_reward'] - base, 3) for c in result['curve']]}, "
            f"drift on chosen {drift[-1]['chosen'] / drift[-1]['ref_chosen']:+.1%}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
