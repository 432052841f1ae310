"""Writing the FiFA subset as a Hub-ready dataset directory, and publishing it.

The directory is what ``load_dataset(output_dir)`` and ``load_dataset("<user>/pickapic-fifa")`` read:
``data/train-*.parquet`` (the selected source rows plus score columns), ``README.md`` (the card),
``scores.parquet`` (every pair's scores, no images, for ``fifa-hf select``), ``fifa_config.yaml``,
``report.json`` and ``margin_histogram.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pandas as pd
import yaml

from fifa_hf.cards import dataset_card, margin_histogram

PUBLISHED_PATTERNS = ["README.md", "data/*.parquet", "scores.parquet", "fifa_config.yaml", "report.json", "*.png"]


def write_subset(output_dir: str | Path, subset: datasets.Dataset, scores: pd.DataFrame, report, config) -> Path:
    """Write the subset, all scores, the config, the report, the histogram and the card."""
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for old in (output_dir / "data").glob("*.parquet"):
        old.unlink()
    subset.to_parquet(str(output_dir / "data" / "train-00000-of-00001.parquet"))
    scores.to_parquet(output_dir / "scores.parquet", index=False)
    (output_dir / "fifa_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (output_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    margin_histogram(scores, output_dir / "margin_histogram.png")
    card = dataset_card(config, report, config.license or source_license(config.dataset) or "unknown")
    card.save(output_dir / "README.md")
    return output_dir


def source_license(dataset: str | None) -> str | None:
    """The license declared by the source dataset's card, if it can be read (local dir or the Hub)."""
    if not dataset:
        return None
    from huggingface_hub import DatasetCard

    try:
        local = Path(dataset) / "README.md"
        card = DatasetCard.load(local) if local.exists() else DatasetCard.load(dataset)
    except Exception:  # offline, private or no card: the caller falls back to the config
        return None
    return card.data.get("license")


def upload_files(
    folder: str | Path,
    repo_id: str,
    repo_type: str,
    patterns: list[str],
    commit_message: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Create the repo if needed and commit the files of ``folder`` matching ``patterns`` in one commit.

    The files are listed explicitly (never caches, checkpoints or logs). The token defaults to ``HF_TOKEN``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})
    operations = [CommitOperationAdd(path.relative_to(folder).as_posix(), str(path)) for path in files]
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id, operations, repo_type=repo_type, commit_message=commit_message, revision=revision
    )
    return str(commit)


def push_subset_to_hub(output_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Publish a FiFA subset directory as a dataset repo."""
    return upload_files(output_dir, repo_id, "dataset", PUBLISHED_PATTERNS, "Upload FiFA subset", private=private)
