"""Issue 17's one-line mutations of core behaviour, each run against the tests: every one must be caught.

The 15 rows of the issue's table, plus three variants marked "(also)" where one behaviour has a second
code path (the endpoint's answers, caption dropout with cached latents, ``fifa-hf select``).

    python mutation/issue17_mutations.py                 # the tests of each mutation's area (a few minutes)
    python mutation/issue17_mutations.py --whole-suite   # the whole suite for each (stops at the first failure)
    python mutation/issue17_mutations.py qsd hinge       # some of them, by name

Each mutation is applied to a copy of the repository (the working tree is never touched), the tests run
there with that copy first on the path (the commands the tests start in subprocesses included), and
the mutation is caught when pytest fails. The same tests run unmutated first and must pass, so a
failure is the mutation's doing. Exit status 1 if any mutation survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    behaviour: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    count: int = 1  # occurrences of ``original`` in ``path``, all replaced


MUTATIONS = [
    Mutation(
        "qsd", "QSD formula psi(c) * (1 - psi(r))", "fifa_hf/selection.py",
        "return ((reward_chosen - low) / span) * (1.0 - (reward_rejected - low) / span)",
        "return ((reward_chosen - low) / span) - ((reward_rejected - low) / span)",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "lora_diffusers_keys", "LoRA saved in diffusers key format", "fifa_hf/trainer/trainer.py",
        "unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),",
        "unet_lora_layers=get_peft_model_state_dict(unet),",
        ("tests/test_trainer.py",),
    ),
    Mutation(
        "same_flip", "the same flip for both images of a pair", "fifa_hf/trainer/collator.py",
        "chosen, rejected = chosen.transpose(Image.FLIP_LEFT_RIGHT), rejected.transpose(Image.FLIP_LEFT_RIGHT)",
        "chosen = chosen.transpose(Image.FLIP_LEFT_RIGHT)",
        ("tests/test_trainer_collator.py", "tests/test_trainer.py"),
    ),
    Mutation(
        "signed_margin", "the signed margin is the default", "fifa_hf/filter.py",
        'absolute=self.config.margin_mode == "absolute"',
        'absolute=self.config.margin_mode != "absolute"',
        ("tests/test_filter.py", "tests/test_rewards.py"),
    ),
    Mutation(
        "caption_dropout", "caption dropout", "fifa_hf/trainer/collator.py",
        "drop = bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)",
        "drop = bool(torch.rand((), generator=generator) < 0.0)",
        ("tests/test_trainer_collator.py", "tests/test_trainer.py"),
    ),
    Mutation(
        "caption_dropout_cached", "(also) caption dropout with cached latents", "fifa_hf/trainer/collator.py",
        "drops.append(bool(torch.rand((), generator=generator) < self.proportion_empty_prompts))",
        "drops.append(bool(torch.rand((), generator=generator) < 0.0))",
        ("tests/test_trainer_collator.py", "tests/test_trainer.py"),
    ),
    Mutation(
        "hinge", "hinge loss relu(1 - beta * x)", "fifa_hf/trainer/loss.py",
        "losses = torch.relu(1 - beta * logits)",
        "losses = torch.relu(1 + beta * logits)",
        ("tests/test_trainer.py",),
    ),
    Mutation(
        "answer_position", "the LLM's answer read at the right token position", "fifa_hf/scoring/quality.py",
        'last = inputs["attention_mask"].sum(dim=1) - 1',
        'last = inputs["attention_mask"].sum(dim=1) - 2',
        ("tests/test_quality.py",),
    ),
    Mutation(
        "scale_0_9", "the LLM's 0-9 scale mapped to [0, 1]", "fifa_hf/scoring/quality.py",
        ").sum(-1) / SCALE_MAX",
        ").sum(-1) / (SCALE_MAX + 1)",
        ("tests/test_quality.py",),
    ),
    Mutation(
        "scale_0_9_endpoint", "(also) an endpoint's 0-9 answer mapped to [0, 1]", "fifa_hf/scoring/quality.py",
        "int(match.group(1)) / SCALE_MAX",
        "int(match.group(1)) / (SCALE_MAX + 1)",
        ("tests/test_quality.py",),
    ),
    Mutation(
        "max_pairs_per_prompt", "max_pairs_per_prompt reaches filter and select", "fifa_hf/filter.py",
        "config.max_pairs_per_prompt, config.seed, config.quality_threshold",
        "None, config.seed, config.quality_threshold",
        ("tests/test_filter.py", "tests/test_cli.py"),
    ),
    Mutation(
        "max_pairs_per_prompt_select", "(also) fifa-hf select --max_pairs_per_prompt", "fifa_hf/cli.py",
        '"max_pairs_per_prompt", "seed", "dataset_name",',
        '"seed", "dataset_name",',
        ("tests/test_filter.py", "tests/test_cli.py"),
    ),
    Mutation(
        "dpo_sign", "the sign of the Diffusion-DPO loss", "fifa_hf/trainer/loss.py",
        "losses = -F.logsigmoid(beta * logits)",
        "losses = -F.logsigmoid(-beta * logits)",
        ("tests/test_trainer.py",),
    ),
    Mutation(
        "label_orientation", "Pick-a-Pic label orientation", "fifa_hf/data.py",
        "swap = label_0 == 0\n",
        "swap = label_0 == 1\n",
        ("tests/test_data.py",),
    ),
    Mutation(
        "ties_dropped", "ties dropped by default", "fifa_hf/data.py",
        "if label_0 == 0.5 and drop_ties:",
        "if label_0 == 0.5 and not drop_ties:",
        ("tests/test_data.py",),
    ),
    Mutation(
        "top_k_tie_break", "top-K ties go to the smaller row_id", "fifa_hf/selection.py",
        "order = np.lexsort((np.asarray(row_ids), -np.where(eligible, scores, -np.inf)))",
        "order = np.lexsort((-np.asarray(row_ids), -np.where(eligible, scores, -np.inf)))",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "kth_neighbour", "diversity reads the k-th neighbour", "fifa_hf/scoring/diversity.py",
        "return knn_search(embeddings, k=k, **kwargs)[0][:, -1]",
        "return knn_search(embeddings, k=k, **kwargs)[0][:, 0]",
        ("tests/test_diversity.py",),
    ),
    Mutation(
        "resume_skipping", "a resumed filter reuses the parts it scored", "fifa_hf/filter.py",
        "frame = parts.load(index, digest)",
        "frame = None",
        ("tests/test_filter.py",),
    ),
]  # fmt: skip


def copy_repository(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree (no venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def apply(mutation: Mutation, repository: Path, check_only: bool = False) -> None:
    path = repository / mutation.path
    text = path.read_text()
    found = text.count(mutation.original)
    if found != mutation.count:
        raise SystemExit(
            f"{mutation.name}: expected {mutation.count} occurrence(s) of {mutation.original!r} in {mutation.path}, "
            f"found {found}; update this script to the code."
        )
    if not check_only:
        path.write_text(text.replace(mutation.original, mutation.mutated))


def run_tests(repository: Path, tests: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repository), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    process = subprocess.run(command, cwd=repository, env=env, capture_output=True, text=True)
    return process.returncode, process.stdout + process.stderr, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all): {[m.name for m in MUTATIONS]}")
    parser.add_argument("--whole-suite", action="store_true", help="run the whole suite for each mutation")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    with tempfile.TemporaryDirectory(prefix="issue17-unmutated-") as directory:
        copy_repository(Path(directory))
        baseline = ["tests"] if args.whole_suite else sorted({test for m in chosen for test in m.tests})
        for mutation in chosen:
            apply(mutation, Path(directory), check_only=True)
        code, output, seconds = run_tests(Path(directory), baseline)
    if code != 0:
        print(output[-5000:], file=sys.stderr)
        raise SystemExit(f"The unmutated tests fail ({' '.join(baseline)}): fix them before judging mutations.")
    print(f"unmutated: {' '.join(baseline)} pass ({seconds:.0f} s)\n")
    survived = []
    print("| mutation | behaviour | tests | result | seconds |\n|---|---|---|---|---|")
    for mutation in chosen:
        with tempfile.TemporaryDirectory(prefix=f"issue17-{mutation.name}-") as directory:
            repository = Path(directory)
            copy_repository(repository)
            apply(mutation, repository)
            tests = ["tests"] if args.whole_suite else list(mutation.tests)
            code, output, seconds = run_tests(repository, tests)
        if code == 1:
            result = "caught"
        elif code == 0:
            result = "SURVIVED"
            survived.append(mutation.name)
        else:  # collection errors, usage errors: the check itself is broken
            print(output[-3000:], file=sys.stderr)
            raise SystemExit(f"{mutation.name}: pytest exited with {code}, not a test failure")
        print(f"| {mutation.name} | {mutation.behaviour} | {' '.join(tests)} | {result} | {seconds:.0f} |", flush=True)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} caught" + (f"; survived: {survived}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
