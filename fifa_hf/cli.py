"""The ``fifa-hf`` command line: one sub-command a job, each parsed from a config dataclass."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class SyntheticArguments:
    """Generate the synthetic Pick-a-Pic and print its statistics."""

    num_pairs: int = field(default=2000, metadata={"help": "Number of preference pairs to generate."})
    seed: int = field(default=0, metadata={"help": "Random seed; the same seed gives the same rows."})
    output_dir: str | None = field(default=None, metadata={"help": "Optional `save_to_disk` directory."})


def synthetic(args: SyntheticArguments) -> None:
    import numpy as np

    from fifa_hf.data import to_preference_pairs
    from fifa_hf.synthetic import make_synthetic_pickapic

    rows = make_synthetic_pickapic(args.num_pairs, seed=args.seed)
    _, report = to_preference_pairs(rows)
    kinds = np.array(rows["prompt_kind"])
    print(f"pairs: {len(rows)}, unique prompts: {len(set(rows['caption']))}")
    print("prompt kinds: " + ", ".join(f"{k}={(kinds == k).mean():.1%}" for k in ("clean", "junk", "unsafe")))
    print(report)
    if args.output_dir:
        rows.save_to_disk(args.output_dir)
        print(f"saved to {args.output_dir}")


COMMANDS: dict[str, tuple[type, Callable]] = {"synthetic": (SyntheticArguments, synthetic)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="fifa-hf", description="FiFA data filtering and Diffusion-DPO.")
    top.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{n}: {c[0].__doc__}" for n, c in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return
    command = top.parse_args(argv[:1]).command
    arguments_class, run = COMMANDS[command]
    parser = HfArgumentParser(arguments_class, prog=f"fifa-hf {command}", description=arguments_class.__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv[1:])
    run(args)


if __name__ == "__main__":
    main()
