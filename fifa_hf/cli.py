"""The ``fifa-hf`` command line: one sub-command a job, each parsed by TrlParser from config dataclasses.

A command's argument classes are imported only when that command runs, so ``fifa-hf --help`` and a
mistyped command answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from fifa_hf.progress import setup_logging

if TYPE_CHECKING:
    from fifa_hf.evaluation.evaluate import EvaluateArguments
    from fifa_hf.filter import FiFAConfig
    from fifa_hf.world.demo import DemoArguments


@dataclass
class SyntheticArguments:
    """Generate the synthetic Pick-a-Pic and print its statistics."""

    num_pairs: int = field(default=2000, metadata={"help": "Number of preference pairs to generate."})
    seed: int = field(default=0, metadata={"help": "Random seed; the same seed gives the same rows."})
    output_dir: str | None = field(default=None, metadata={"help": "Optional `save_to_disk` directory."})


def synthetic(args: SyntheticArguments) -> None:
    import numpy as np

    from fifa_hf.data import to_preference_pairs
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    rows = make_synthetic_pickapic(args.num_pairs, seed=args.seed)
    _, report = to_preference_pairs(rows)
    kinds = np.array(rows["prompt_kind"])
    print(f"pairs: {len(rows)}, unique prompts: {len(set(rows['caption']))}")
    print("prompt kinds: " + ", ".join(f"{k}={(kinds == k).mean():.1%}" for k in ("clean", "junk", "unsafe")))
    print(report)
    if args.output_dir:
        rows.save_to_disk(args.output_dir)
        print(f"saved to {args.output_dir}")


def filter_command(config: FiFAConfig) -> None:
    from fifa_hf.filter import FiFAFilter
    from fifa_hf.hub import push_subset_to_hub

    fifa = FiFAFilter(config)  # resolves every model (and the repo to push to) before any work
    result = fifa.run()
    print(result.report)
    print(f"wrote {config.output_dir}")
    if config.push_to_hub:
        url = push_subset_to_hub(config.output_dir, config.hub_model_id, private=config.hub_private_repo)
        print(f"pushed to {url}")


@dataclass
class SelectArguments:
    """Re-select from the scores a `fifa-hf filter` run saved, with other settings, without rescoring."""

    scores: str = field(metadata={"help": "Output directory of a `fifa-hf filter` run (holds scores.parquet)."})
    output_dir: str = field(metadata={"help": "Where the new subset, card and scores are written."})
    method: str | None = field(
        default=None, metadata={"help": "setwise, fifa, margin, qsd or random (default: as filtered)."}
    )
    k: float | None = field(default=None, metadata={"help": "Pairs to keep: a count or a fraction."})
    alpha: float | None = field(default=None, metadata={"help": "Weight of prompt quality."})
    gamma: float | None = field(default=None, metadata={"help": "Weight of prompt diversity."})
    normalization: str | None = field(default=None, metadata={"help": "zscore, minmax or none."})
    quality_threshold: float | None = field(default=None, metadata={"help": "setwise: the quality gate."})
    diminishing_returns: float | None = field(
        default=None, metadata={"help": "setwise: lambda of the per-prompt diminishing returns."}
    )
    setwise_base: str | None = field(default=None, metadata={"help": "setwise: margin or qsd."})
    max_pairs_per_prompt: int | None = field(default=None, metadata={"help": "Cap on selected pairs per prompt."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the random baseline."})
    strict: bool = field(default=False, metadata={"help": "Fail, rather than warn, when k keeps every scored pair."})
    dataset_name: str | None = field(default=None, metadata={"help": "Source dataset, if it moved since filtering."})
    dataset_revision: str | None = field(
        default=None,
        metadata={
            "help": "Revision of a Hub source (default: the commit the filter read, unless --dataset_name is given)."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the new subset as a Hub dataset repo."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Dataset repo to push to (`user/name` or `name`); default: output_dir's name."}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo private."})


SELECT_OVERRIDES = (
    "method", "k", "alpha", "gamma", "normalization", "quality_threshold", "diminishing_returns", "setwise_base",
    "max_pairs_per_prompt", "seed", "dataset_name", "dataset_revision",
)  # fmt: skip


def select_command(args: SelectArguments) -> None:
    from fifa_hf.filter import reselect
    from fifa_hf.hub import create_dataset_repo, push_subset_to_hub

    overrides = {name: getattr(args, name) for name in SELECT_OVERRIDES if getattr(args, name) is not None}
    repo_id = (
        create_dataset_repo(args.hub_model_id, args.output_dir, args.hub_private_repo) if args.push_to_hub else None
    )
    result = reselect(
        args.scores, args.output_dir, strict=args.strict, push_to_hub=args.push_to_hub, hub_model_id=repo_id,
        hub_private_repo=args.hub_private_repo, **overrides,
    )  # fmt: skip
    print(result.report)
    print(f"wrote {args.output_dir}")
    if args.push_to_hub:
        print(f"pushed to {push_subset_to_hub(args.output_dir, repo_id, private=args.hub_private_repo)}")


def demo_command(args: DemoArguments) -> None:
    from fifa_hf.world.demo import run_demo, summary_table

    if args.full:
        from fifa_hf.world.miniature import MiniatureArguments, run_experiment

        output_dir = args.output_dir if args.output_dir != "fifa_demo" else "fifa_demo_full"
        design = MiniatureArguments.quick if args.quick else MiniatureArguments
        run_experiment(design(output_dir=output_dir, workers=args.workers))
        print((Path(output_dir) / "report.md").read_text())
        return

    result = run_demo(args)
    print(summary_table(result["summary"]))
    print(f"default method by the rule of docs/selection.md: {result['default_method']}")
    print(f"report: {args.output_dir}/report.md, results: {args.output_dir}/results.json")


def train_command(script_args, training_args, model_args) -> None:
    from fifa_hf.trainer.script import train

    train(script_args, training_args, model_args)


def evaluate_command(args: EvaluateArguments) -> None:
    from fifa_hf.evaluation import evaluate

    evaluate(args)
    print((Path(args.output_dir) / "results.md").read_text())
    print(f"wrote {args.output_dir}/results.json, results.md and grid.png")


@dataclass(frozen=True)
class Command:
    """A sub-command: a one-line summary, its argument classes (``"module:Class"``, parsed in that order by
    one TrlParser) and the function that takes the parsed objects."""

    summary: str
    arguments: tuple[str, ...]
    run: Callable[..., None]

    def argument_classes(self) -> tuple[type, ...]:
        return tuple(getattr(import_module(module), name) for module, name in (a.split(":") for a in self.arguments))


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "FiFA and its baselines on a synthetic Pick-a-Pic, scored against the known truth (offline).",
        ("fifa_hf.world.demo:DemoArguments",),
        demo_command,
    ),
    "evaluate": Command(
        "Generate on a fixed prompt set, score with reward models, compare with a baseline.",
        ("fifa_hf.evaluation.evaluate:EvaluateArguments",),
        evaluate_command,
    ),
    "filter": Command(
        "Score a preference dataset (margin, prompt quality, diversity) and keep the FiFA subset.",
        ("fifa_hf.filter:FiFAConfig",),
        filter_command,
    ),
    "select": Command(
        "Re-select from the scores of a `fifa-hf filter` run with other settings, without rescoring.",
        ("fifa_hf.cli:SelectArguments",),
        select_command,
    ),
    "synthetic": Command(
        "Generate the synthetic Pick-a-Pic and print its statistics.",
        ("fifa_hf.cli:SyntheticArguments",),
        synthetic,
    ),
    "train": Command(
        "Diffusion-DPO on a preference dataset (e.g. a FiFA subset): SD1.5 or SDXL, LoRA or full.",
        ("trl:ScriptArguments", "fifa_hf.trainer.config:DiffusionDPOConfig", "trl:ModelConfig"),
        train_command,
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    from fifa_hf import __version__

    top = argparse.ArgumentParser(
        prog="fifa-hf",
        description="FiFA data filtering and Diffusion-DPO for text-to-image models.",
        epilog="`fifa-hf <command> --help` lists a command's options; `--config recipe.yaml` reads them from YAML.",
    )
    top.add_argument("--version", action="version", version=f"fifa-hf {__version__}")
    commands = top.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, command in COMMANDS.items():
        # The command's own options are parsed by its TrlParser, so its help comes from there.
        commands.add_parser(name, help=command.summary, add_help=False)
    return top


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    top = _top_parser()
    if not argv:
        top.print_help()
        return
    namespace, _ = top.parse_known_args(argv[:1])
    if namespace.command is None:
        top.error(f"the first argument must be a command ({', '.join(COMMANDS)}), got {argv[0]!r}")
    command = COMMANDS[namespace.command]
    from trl import TrlParser

    from fifa_hf.errors import InputError

    parser = TrlParser(command.argument_classes(), prog=f"fifa-hf {namespace.command}", description=command.summary)
    try:
        arguments = parser.parse_args_and_config(argv[1:])
    except ValueError as error:  # a config's own check (__post_init__) of the values given
        parser.error(str(error))
    try:
        command.run(*arguments)
    except InputError as error:  # input the user can fix: say what, as argparse does, without a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
