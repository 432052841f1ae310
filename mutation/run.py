"""The mutation check of fifa-hf's core behaviour: mutmut over the functions in ``SCOPE``, resumable.

    pip install -e ".[dev,mutation]"
    python mutation/run.py             # generate mutants, test those without a verdict, re-test survivors, report
    python mutation/run.py selection   # only the modules named (keys of SCOPE)
    python mutation/run.py --report    # the figures of the runs so far, nothing run
    python mutation/run.py --max-children 2   # two mutants at a time (one thread each)

mutmut (configured in setup.cfg's ``[mutmut]``) mutates whole files; this script picks the functions
that carry the behaviour (``SCOPE``), leaves out the mutants listed in ``EQUIVALENT`` (no behaviour a
user could observe changes), runs the rest at low priority, one at a time, and prints killed / total
per module with every survivor's diff. Verdicts persist in ``mutants/``: an interrupted run resumes
where it stopped, and a function whose source changed is tested again.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module label -> mutmut name patterns (module path, then ``x_<function>`` or ``xǁ<class>ǁ<method>``).
SCOPE = {
    "selection": ["fifa_hf.selection.*"],
    "loss": ["fifa_hf.trainer.loss.*"],
    "data orientation": [
        f"fifa_hf.data.{name}__mutmut_*"
        for name in (
            "x__label_reason",
            "x_orient_pairs",
            "x_detect_schema",
            "x_image_bytes",
            "x_image_problem",
            "x_map_to_pairs",
            "x_to_preference_pairs",
            "x_unmarked",
            "xǁRowReportǁ*",
        )
    ],
    # ``score_batch`` (the answer's token position and the 0-9 -> [0, 1] map of the LLM) is decorated
    # with ``torch.inference_mode``, which mutmut does not mutate: mutation/issue17_mutations.py covers it.
    "quality parsing": [
        "fifa_hf.scoring.quality.x_parse_score__mutmut_*",
        "fifa_hf.scoring.quality.xǁTransformersQualityScorerǁ_load__mutmut_*",
    ],
    "margin": ["fifa_hf.scoring.margin.*"],
    "collator": ["fifa_hf.trainer.collator.*"],
    "diversity": ["fifa_hf.scoring.diversity.*"],
}

# Mutants that change no behaviour a user could observe, keyed by function and the mutated line(s) as
# mutmut prints them (``mutmut show``), so they stay matched when mutant numbers shift.
EQUIVALENT: list[tuple[str, str, str]] = [
    # (function, mutated line(s), why no behaviour changes)
    (
        "fifa_hf.scoring.quality.x_parse_score",
        'match = _ANSWER.fullmatch(text or "XXXX")',
        "a missing answer is matched as 'XXXX' instead of '': neither is a digit, both give None",
    ),
    (
        "fifa_hf.scoring.margin.xǁMarginScorerǁ_score_images",
        "rewards[rows] = self.reward_model.score(prompts, images).reshape(-2, 2)",
        "numpy reads any negative size in reshape as 'infer', as it reads -1",
    ),
    *[
        ("fifa_hf.scoring.diversity.x_knn_search", line, "faiss converts what it is given to float32 itself")
        for line in (
            "embeddings = np.ascontiguousarray(embeddings, dtype=None)",
            "embeddings = np.ascontiguousarray(embeddings, )",
        )
    ],
    *[
        ("fifa_hf.scoring.diversity.x_knn_search", line, "numpy's default dtype is float64")
        for line in (
            "distances, ids = np.empty((n, k), dtype=None), np.empty((n, k), dtype=np.int64)",
            "distances, ids = np.empty((n, k), ), np.empty((n, k), dtype=np.int64)",
        )
    ],
    (
        "fifa_hf.scoring.diversity.x_knn_search",
        "faiss.cvar.distance_compute_blas_threshold = 17",
        "a speed switch: faiss computes batches of exactly 17 queries without BLAS (same neighbours, float rounding)",
    ),
    # numpy dtypes: the values are floats (NaN for unscored), booleans, integer positions or strings, and
    # every later step computes in float64 or only groups, so the inferred dtype changes no number.
    *[
        (function, line, "numpy infers the dtype the line asked for, or one that gives the same numbers")
        for function, lines in (
            (
                "fifa_hf.selection.x_normalize",
                ("values = np.asarray(values, dtype=None)", "values = np.asarray(values, )"),
            ),
            (
                "fifa_hf.selection.x_qsd_score",
                ("rewards = np.concatenate([reward_chosen, reward_rejected]).astype(None)",),
            ),
            (
                "fifa_hf.selection.x_diminishing_returns_score",
                (
                    "scores = np.asarray(scores, dtype=None)",
                    "scores = np.asarray(scores, )",
                    "codes = pd.factorize(np.asarray(prompts, dtype=None))[0]",
                    "codes = pd.factorize(np.asarray(prompts, ))[0]",
                ),
            ),
            (
                "fifa_hf.selection.x_setwise_score",
                (
                    'raw = np.asarray(columns["margin"], dtype=None)',
                    'raw = np.asarray(columns["margin"], )',
                    'prompts = np.asarray(columns["prompt"], dtype=None)[passed]',
                    'prompts = np.asarray(columns["prompt"], )[passed]',
                ),
            ),
            (
                "fifa_hf.selection.x_top_k",
                (
                    "scores = np.asarray(scores, dtype=None)",
                    "scores = np.asarray(scores, )",
                    "eligible = np.ones(len(scores), dtype=bool) if eligible is None else np.asarray(eligible, dtype=None)",
                    "eligible = np.ones(len(scores), dtype=bool) if eligible is None else np.asarray(eligible, )",
                    "return np.asarray(chosen, dtype=None)",
                    "return np.asarray(chosen, )",
                ),
            ),
            (
                "fifa_hf.selection.x_select",
                (
                    'scores = np.asarray(columns["margin"], dtype=None)',
                    'scores = np.asarray(columns["margin"], )',
                ),
            ),
        )
        for line in lines
    ],
    (
        "fifa_hf.selection.x_normalize",
        "span = values.max() - values.min() if len(values) else 1.0",
        "the span of no values divides no values",
    ),
    (
        "fifa_hf.selection.x_qsd_score",
        "span = span if span > 0 else 2.0",
        "the fallback span divides only zeros: with one reward everywhere every psi is 0",
    ),
    ("fifa_hf.selection.x_setwise_score", "base_scores = normalize(raw[passed], )", "normalize's default is zscore"),
    (
        "fifa_hf.selection.x_select",
        'columns["margin"], columns.get("quality"), columns.get("diversity"), alpha, gamma, )',
        "fifa_score's default normalization is select's, zscore",
    ),
    (
        "fifa_hf.selection.x_select",
        'prompts = list(columns["prompt"]) if (max_per_prompt) or True else None',
        "top_k reads the prompts only when max_per_prompt is set",
    ),
    ("fifa_hf.selection.x_resolve_k", "if k <= 0 or (k > 1 and k != int(k)):", "k = 1 is an integer either way"),
    *[
        (
            "fifa_hf.trainer.collator.x_pair_generator",
            line,
            "another mixing of (seed, epoch, pair) into a seed: streams stay distinct and reproducible",
        )
        for line in (
            "return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 - pair_index) % 2**63)",
            "return torch.Generator().manual_seed(((seed * 1_000_003 - epoch) * 1_000_003 + pair_index) % 2**63)",
            "return torch.Generator().manual_seed(((seed * 1000004 + epoch) * 1_000_003 + pair_index) % 2**63)",
        )
    ],
    *[
        (
            "fifa_hf.trainer.collator.xǁCachedPairCollatorǁ__call__",
            line,
            "torch.rand draws exactly the threshold with probability 2^-24 at most",
        )
        for line in (
            "flips.append(self.hflip and bool(torch.rand((), generator=generator) <= 0.5))",
            "drops.append(bool(torch.rand((), generator=generator) <= self.proportion_empty_prompts))",
        )
    ],
    *[
        (
            "fifa_hf.trainer.collator.xǁDiffusionDPOCollatorǁ__call__",
            line,
            "torch.rand draws exactly the threshold with probability 2^-24 at most",
        )
        for line in (
            "flip = self.hflip and bool(torch.rand((), generator=generator) <= 0.5)",
            "drop = bool(torch.rand((), generator=generator) <= self.proportion_empty_prompts)",
        )
    ],
    *[
        ("fifa_hf.trainer.collator.xǁSharedEpochǁ__init__", line, "a float32 epoch is exact up to 2^24 epochs")
        for line in (
            "self._value = torch.zeros((), dtype=None).share_memory_()",
            "self._value = torch.zeros((), ).share_memory_()",
        )
    ],
    (
        "fifa_hf.data.x__label_reason",
        "if label_0 is None and (isinstance(label_0, float) and math.isnan(label_0)) or label_0 not in (0, 0.5, 1):",
        "None and NaN are not in (0, 0.5, 1): the membership test gives them the same reason",
    ),
    (
        "fifa_hf.scoring.diversity.xǁPromptEmbedderǁ__init__",
        "self, model_name_or_path: str = DEFAULT_EMBEDDING_MODEL, device: str | None = None, batch_size: int = 257",
        "the encoder's batch size changes speed only (attention masks keep padded rows apart)",
    ),
    (
        "fifa_hf.scoring.diversity.xǁPromptEmbedderǁ__call__",
        "step = 17 * self.batch_size",
        "the prompts per progress update change, not the embeddings",
    ),
    *[
        ("fifa_hf.scoring.diversity.x_knn_search", line, "numpy reads any negative size in reshape as 'infer'")
        for line in (
            "distances[start:stop] = np.sqrt(np.maximum(found_distances[~own].reshape(-2, k), 0.0))",
            "ids[start:stop] = found_ids[~own].reshape(-2, k)",
        )
    ],
]

KILLED = {"killed", "timeout", "caught by type check"}


def _quiet_mutmut():
    """mutmut's API, run from the project root where its config and ``mutants/`` live."""
    os.chdir(ROOT)
    import mutmut.__main__ as mutmut_main

    return mutmut_main


def generate() -> None:
    """Write (or refresh) the mutants; functions whose source changed lose their verdicts."""
    mutmut_main = _quiet_mutmut()
    with contextlib.redirect_stdout(io.StringIO()):
        Path("mutants").mkdir(exist_ok=True)
        mutmut_main.copy_src_dir()
        mutmut_main.copy_also_copy_files()
        mutmut_main.create_mutants(1)


def scope_of(name: str, modules: list[str]) -> str | None:
    for label in modules:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in SCOPE[label]):
            return label
    return None


def mutated_lines(name: str, path: Path) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()[2:]
    return "\n".join(line[1:].strip() for line in diff if line.startswith("+"))


def collect(modules: list[str]) -> dict[str, dict]:
    """Every in-scope mutant: its module label, file, verdict and the line(s) it changes."""
    mutmut_main = _quiet_mutmut()
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    found = {}
    for path in mutmut_main.walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in data.exit_code_by_key.items():
            label = scope_of(name, modules)
            if label is None:
                continue
            function = mangled_name_from_mutant_name(name)
            found[name] = {
                "module": label,
                "path": path,
                "function": function,
                "status": mutmut_main.status_by_exit_code[exit_code],
                "lines": mutated_lines(name, path),
            }
    equivalent = {(function, lines): why for function, lines, why in EQUIVALENT}
    used = set()
    for mutant in found.values():
        key = (mutant["function"], mutant["lines"])
        if key in equivalent:
            mutant["status"], mutant["why"] = "equivalent", equivalent[key]
            used.add(key)
    for function, lines in set(equivalent) - used:
        if scope_of(f"{function}__mutmut_0", modules):
            print(f"warning: EQUIVALENT entry matches no mutant (stale?): {function}: {lines}", file=sys.stderr)
    return found


def run(names: list[str], children: int) -> int:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
    command = ["nice", "-n", "15", sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    return subprocess.call(command, cwd=ROOT, env=env)


def report(found: dict[str, dict]) -> None:
    by_module = defaultdict(list)
    for name, mutant in found.items():
        by_module[mutant["module"]].append((name, mutant))
    print("\n| module | killed | survived | not tested yet | equivalent | figure |")
    print("|---|---|---|---|---|---|")
    totals = defaultdict(int)
    for label in SCOPE:
        mutants = [m for _, m in by_module.get(label, [])]
        if not mutants:
            continue
        killed = sum(m["status"] in KILLED for m in mutants)
        equivalent = sum(m["status"] == "equivalent" for m in mutants)
        pending = sum(m["status"] == "not checked" for m in mutants)
        survived = len(mutants) - killed - equivalent - pending
        judged = len(mutants) - equivalent
        for key, value in (("killed", killed), ("survived", survived), ("pending", pending), ("eq", equivalent)):
            totals[key] += value
        print(
            f"| {label} | {killed} | {survived} | {pending} | {equivalent} | "
            f"{killed}/{judged} = {killed / max(judged, 1):.1%} |"
        )
    judged = totals["killed"] + totals["survived"] + totals["pending"]
    print(
        f"| all | {totals['killed']} | {totals['survived']} | {totals['pending']} | {totals['eq']} | "
        f"{totals['killed']}/{judged} = {totals['killed'] / max(judged, 1):.1%} |"
    )
    for label in SCOPE:
        survivors = [(n, m) for n, m in by_module.get(label, []) if m["status"] not in KILLED | {"equivalent"}]
        survivors = [(n, m) for n, m in survivors if m["status"] != "not checked"]
        if survivors:
            print(f"\n{label}: not killed")
            for name, mutant in survivors:
                print(f"  {name} [{mutant['status']}]: {mutant['lines']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"modules of SCOPE (default: all): {', '.join(SCOPE)}")
    parser.add_argument("--report", action="store_true", help="print the figures so far; run nothing")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (one thread each)")
    args = parser.parse_args()
    unknown = set(args.modules) - set(SCOPE)
    if unknown:
        parser.error(f"unknown module(s) {sorted(unknown)}; choose from {list(SCOPE)}")
    modules = args.modules or list(SCOPE)
    if not args.report:
        generate()
        found = collect(modules)
        todo = [name for name, m in found.items() if m["status"] not in KILLED | {"equivalent"}]
        print(f"{len(todo)} of {len(found)} mutants in scope to test")
        if todo and run(todo, args.max_children) != 0:
            print("mutmut stopped with an error (see above); verdicts so far are kept", file=sys.stderr)
    report(collect(modules))


if __name__ == "__main__":
    main()
