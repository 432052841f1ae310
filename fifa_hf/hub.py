"""Writing the FiFA subset as a Hub-ready dataset directory, and publishing it.

The directory is what ``load_dataset(output_dir)`` and ``load_dataset("<user>/pickapic-fifa")`` read:
``data/train-*.parquet`` (the selected source rows plus score columns), ``README.md`` (the card),
``scores.parquet`` (every pair's scores, no images, for ``fifa-hf select``), ``fifa_config.yaml``,
``report.json`` and two figures. It is built beside the old one and swapped in whole
(``fifa_hf.storage.atomic_output_dir``); resume state (score parts, the prompt cache) and anything
else that is not published output is carried over. Nothing published holds an absolute local path
or a credential: paths are written relative to the working directory (or by name) and URLs redacted;
the source's real location stays in the unpublished ``local_source.json`` for ``fifa-hf select``.
"""

from __future__ import annotations

import glob
import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import yaml
from datasets.features.features import require_storage_embed
from datasets.table import embed_table_storage

from fifa_hf.cards import dataset_card, pairs_grid, signal_histograms
from fifa_hf.errors import InputError
from fifa_hf.progress import datasets_bars_disabled
from fifa_hf.redact import published_reference
from fifa_hf.storage import atomic_output_dir, files_matching, matches_any

PUBLISHED_PATTERNS = ["README.md", "data/*.parquet", "scores.parquet", "fifa_config.yaml", "report.json", "*.png"]
LOCAL_SOURCE_FILE = "local_source.json"
OUTPUT_MARKERS = ("fifa_config.yaml", "scores_parts")  # what every fifa-hf output (or a resumable run) holds


def check_output_dir(output_dir: str | Path, dataset_name: str | None = None) -> None:
    """Refuse an output directory that a run would wipe, before any work.

    A new output replaces every published entry of the old one (``data/``, ``README.md``, ``*.png``...), so
    only a new or empty directory or an earlier fifa-hf output may be written to, and never one that holds
    the source rows (``dataset_name``, when it is a local path).
    """
    output = Path(output_dir).expanduser().resolve()
    if dataset_name:
        pattern = os.path.expanduser(dataset_name)
        sources = [Path(path).resolve() for path in (glob.glob(pattern) if glob.has_magic(pattern) else [pattern])]
        for source in sources:
            if source.exists() and (source == output or output in source.parents):
                raise InputError(
                    f"--output_dir {output_dir} holds the source rows ({dataset_name}): writing the subset would "
                    "delete them. Choose another output directory."
                )
    if output.exists() and not output.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file. Choose a directory.")
    if output.is_dir() and not any((output / marker).exists() for marker in OUTPUT_MARKERS):
        entries = sorted(entry.name for entry in output.iterdir())
        if entries:
            raise InputError(
                f"--output_dir {output_dir} is not empty and not a fifa-hf output (it holds {', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}): writing the subset would replace its data/, README.md and "
                "figures. Choose a new or empty directory."
            )


def is_resume_state(name: str) -> bool:
    """Entries of an output directory that a new output keeps: everything that is not published output."""
    return not matches_any(name, PUBLISHED_PATTERNS)


def published_config(config) -> dict[str, Any]:
    """``config.to_dict()`` with every string made fit for publishing (``published_reference``)."""
    return {name: published_reference(value) for name, value in config.to_dict().items()}


def write_subset(output_dir: str | Path, subset: datasets.Dataset, scores: pd.DataFrame, report, config) -> Path:
    """Write the subset, all scores, the config, the report, the figures and the card, atomically."""
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, keep=is_resume_state) as staging, datasets_bars_disabled():
        (staging / "data").mkdir()
        embedded(subset).to_parquet(str(staging / "data" / "train-00000-of-00001.parquet"))
        scores.to_parquet(staging / "scores.parquet", index=False)
        (staging / "fifa_config.yaml").write_text(yaml.safe_dump(published_config(config), sort_keys=False))
        source = {"dataset_name": config.dataset_name, "split": config.split}
        (staging / LOCAL_SOURCE_FILE).write_text(json.dumps(source, indent=2))
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        figures = {"histograms": signal_histograms(scores, staging / "signal_histograms.png").name}
        if pairs_grid(subset, staging / "example_pairs.png") is not None:
            figures["pairs"] = "example_pairs.png"
        license = config.license or source_license(config.dataset_name) or "unknown"
        repo_id = config.hub_model_id if config.push_to_hub else None
        dataset_card(config, report, license, repo_id=repo_id, figures=figures).save(staging / "README.md")
    return output_dir


def embedded(rows: datasets.Dataset) -> datasets.Dataset:
    """``rows`` with every image or audio cell that refers to a local file holding that file's bytes (and only its
    name), as ``Dataset.push_to_hub`` writes them: ``to_parquet`` keeps the reference, an absolute local path that
    no one else can load. Rows without such features (Pick-a-Pic's images are plain bytes) are returned as they
    are, still memory-mapped; the others are embedded in memory."""
    if not any(require_storage_embed(feature) for feature in rows.features.values()):
        return rows
    arrow = rows.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
    return arrow.with_format(**rows.format)


def source_license(dataset: str | None) -> str | None:
    """The license declared by the source dataset's card, if it can be read (local dir or the Hub)."""
    if not dataset:
        return None
    from huggingface_hub import DatasetCard

    local = Path(dataset).expanduser()
    try:
        if local.exists():  # a local source: its own card or none, never a Hub lookup
            card = DatasetCard.load(local / "README.md") if (local / "README.md").exists() else None
        else:
            card = DatasetCard.load(dataset)
    except Exception:  # offline, private or no card: the caller falls back to the config
        return None
    return card.data.get("license") if card else None


def hub_repo_id(hub_model_id: str | None, output_dir: str | Path) -> str:
    """The full ``owner/name`` to push to: ``hub_model_id`` (TRL's default: the output directory's name),
    in the token owner's namespace when it names no owner. Asks the Hub who the token belongs to."""
    name = hub_model_id or Path(output_dir).name
    if "/" in name:
        return name
    from huggingface_hub import HfApi

    return f"{HfApi().whoami()['name']}/{name}"


def create_dataset_repo(hub_model_id: str | None, output_dir: str | Path, private: bool | None = None) -> str:
    """The dataset repo to push to (``hub_repo_id``), created now if it does not exist, as TRL's trainers create
    theirs when they start: a missing or read-only token fails here, before any work, not once the subset is done."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    fix = "Set HF_TOKEN to a token with write access (or run `hf auth login`)."
    repo_id = hub_model_id or Path(output_dir).name
    try:
        repo_id = hub_repo_id(hub_model_id, output_dir)
        HfApi(token=os.environ.get("HF_TOKEN")).create_repo(
            repo_id, repo_type="dataset", private=private, exist_ok=True
        )
    except LocalTokenNotFoundError as error:
        raise InputError(f"--push_to_hub needs a Hub token, and none is set. {fix}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise InputError(
                f"--push_to_hub: the Hub refused to create or write the dataset repo {repo_id!r} (HTTP {status}). {fix}"
            ) from error
        raise
    return repo_id


def upload_files(
    folder: str | Path,
    repo_id: str,
    repo_type: str,
    patterns: list[str],
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
):
    """Create the repo if needed and commit the files of ``folder`` matching ``patterns`` in one commit.

    The files are listed explicitly (never caches, checkpoints or logs). The token defaults to ``HF_TOKEN``.
    Returns the commit (its text is the commit's URL).
    """
    return _upload(folder, repo_id, repo_type, patterns, commit_message, private, token, revision)[1]


def _upload(folder, repo_id, repo_type, patterns, commit_message, private, token=None, revision=None, replace=()):
    """``replace``: patterns of repo files that this commit's files replace; the repo's others matching them go."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): path for path in files_matching(folder, patterns)}
    operations = [CommitOperationAdd(name, str(path)) for name, path in files.items()]
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if replace:
        existing = api.list_repo_files(repo_url.repo_id, repo_type=repo_type, revision=revision)
        stale = [name for name in existing if any(fnmatch(name, p) for p in replace) and name not in files]
        operations += [CommitOperationDelete(name) for name in stale]
    commit = api.create_commit(
        repo_url.repo_id, operations, repo_type=repo_type, commit_message=commit_message, revision=revision
    )
    return repo_url, commit


def push_subset_to_hub(output_dir: str | Path, repo_id: str, private: bool | None = None) -> str:
    """Publish a FiFA subset directory as a dataset repo; returns the repo's URL, as the Hub reports it.

    Data files already in the repo that this subset does not have (an earlier upload's other shards) are deleted
    in the same commit: ``load_dataset`` would read them beside the new rows.
    """
    repo_url, _ = _upload(
        output_dir, repo_id, "dataset", PUBLISHED_PATTERNS, "Upload FiFA subset", private, replace=["data/*"]
    )
    return str(repo_url)
