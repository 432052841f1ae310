"""Fixed prompt sets for evaluation: PartiPrompts (bundled), local files, and Hub datasets."""

from __future__ import annotations

import csv
import json
import logging
from importlib import resources
from pathlib import Path

from fifa_hf.errors import InputError
from fifa_hf.resolve import resolve_hub_reference, resolve_local_path

logger = logging.getLogger(__name__)

PICKAPIC_TEST_UNIQUE = "yuvalkirstain/pickapic_v2@test_unique:caption"
PROMPT_FILE_SUFFIXES = (".txt", ".tsv", ".jsonl")
ALIASES = {"pickapic": PICKAPIC_TEST_UNIQUE, "pickapic_test_unique": PICKAPIC_TEST_UNIQUE}


def partiprompts(category: str | list[str] | None = None, challenge: str | list[str] | None = None) -> list[str]:
    """The bundled PartiPrompts (1,632 prompts), optionally only some Categories and Challenges."""
    categories = [category] if isinstance(category, str) else category
    challenges = [challenge] if isinstance(challenge, str) else challenge
    with resources.files("fifa_hf").joinpath("resources/PartiPrompts.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    known = {"Category": {row["Category"] for row in rows}, "Challenge": {row["Challenge"] for row in rows}}
    for column, wanted in (("Category", categories), ("Challenge", challenges)):
        unknown = set(wanted or ()) - known[column]
        if unknown:
            raise InputError(f"Unknown PartiPrompts {column} {sorted(unknown)}; choose from {sorted(known[column])}.")
    return [
        row["Prompt"]
        for row in rows
        if (not categories or row["Category"] in categories) and (not challenges or row["Challenge"] in challenges)
    ]


def _from_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        column = next((c for c in ("Prompt", "prompt", "caption") if rows and c in rows[0]), None)
        if column is None:
            raise InputError(f"{path} needs a 'Prompt', 'prompt' or 'caption' column.")
        return [row[column] for row in rows]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number} is not JSON ({error.msg}).") from error
                prompt = record.get("prompt", record.get("caption")) if isinstance(record, dict) else None
                if not isinstance(prompt, str):
                    raise InputError(f"{path}:{number} has no string 'prompt' or 'caption'.")
                prompts.append(prompt)
        return prompts
    raise InputError(f"Prompt files must be .txt, .tsv or .jsonl, got {path}.")


def _from_hub(spec: str) -> list[str]:
    """``<dataset>[@split]:<column>``, streamed so only the text column is read; the dataset is checked first,
    so a wrong id or no connection fails at once."""
    import datasets

    name, column = spec.rsplit(":", 1)
    name, _, split = name.partition("@")
    resolve_hub_reference(name, "--prompts", repo_type="dataset", download=False)
    rows = datasets.load_dataset(name, split=split or "test", streaming=True).select_columns([column])
    return [row[column] for row in rows]


def load_prompts(
    spec: str,
    category: str | list[str] | None = None,
    challenge: str | list[str] | None = None,
    max_prompts: int | None = None,
) -> list[str]:
    """Unique, non-empty prompts in first-seen order.

    ``spec`` is ``"partiprompts"`` (bundled; ``category`` / ``challenge`` filter it), ``"pickapic"``
    (Pick-a-Pic v2 ``test_unique`` from the Hub), a ``.txt`` / ``.tsv`` / ``.jsonl`` file, or a Hub
    dataset as ``<dataset>[@split]:<column>``.
    """
    spec = ALIASES.get(spec, spec)
    if spec == "partiprompts":
        prompts = partiprompts(category, challenge)
    elif category or challenge:
        raise InputError("category and challenge filter PartiPrompts only.")
    elif Path(spec).is_file():
        prompts = _from_file(Path(spec))
    elif Path(spec).suffix in PROMPT_FILE_SUFFIXES:
        resolve_local_path(spec, "--prompts")  # raises: the file does not exist
    elif ":" in spec:
        prompts = _from_hub(spec)
    else:
        raise InputError(
            f"Unknown prompt set {spec!r}: use 'partiprompts', 'pickapic', a .txt/.tsv/.jsonl file "
            "or '<hub dataset>[@split]:<column>'."
        )
    unique = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if not unique:
        raise InputError(f"No prompts in {spec!r}.")
    if len(unique) < len(prompts):
        logger.info(
            "%s: %d of %d prompts skipped (empty, not text, or repeated).",
            spec,
            len(prompts) - len(unique),
            len(prompts),
        )
    return unique[:max_prompts] if max_prompts else unique
