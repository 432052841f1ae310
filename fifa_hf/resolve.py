"""Resolving model and dataset references before any long work starts.

Each command resolves every model it will load (reward model, processor, quality LLM, embedder,
pipeline) and its dataset first. A local path must exist. A Hub id is downloaded once with
``snapshot_download``, or found in the local cache when the Hub cannot be reached, and the loaders
then read the local snapshot without touching the network again. A reference that cannot be resolved
fails at once with the flag, the id and what to do instead, not after minutes of scoring and a
transformers retry loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from fifa_hf.errors import InputError

# What to download of a Hub repo (``allow_patterns``): only the files the loaders read, not the single-file
# checkpoints, fp16/non-EMA variants, .bin duplicates or the safety checker that big repos also hold.
DIFFUSERS_PIPELINE_FILES = [
    "model_index.json",
    "README.md",  # the base model's license, for a trained model's card
    "scheduler/*",
    "feature_extractor/*",
    "tokenizer*/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
    "vae/diffusion_pytorch_model-*-of-*.safetensors",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "text_encoder*/model.safetensors.index.json",
    "text_encoder*/model-*-of-*.safetensors",
]
LORA_FILES = ["*.safetensors", "*.json"]
TRANSFORMERS_MODEL_FILES = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]
PROCESSOR_FILES = ["*.json", "*.txt"]
PICKLED_WEIGHTS = ["pytorch_model*.bin"]  # fetched only from a repo without safetensors weights


class ResolutionError(InputError):
    """A model or dataset reference that cannot be used; the message names the flag and the fix."""


def resolve_model_files(reference: str | os.PathLike, flag: str, allow_patterns: list[str]) -> str:
    """``resolve_hub_reference`` for a transformers model: from a Hub repo without safetensors weights, its
    PyTorch pickles (``pytorch_model*.bin``) instead, so that a model that loads is never fetched without weights."""
    path = resolve_hub_reference(reference, flag, allow_patterns=allow_patterns)
    if not Path(str(reference)).expanduser().exists() and not any(Path(path).rglob("*.safetensors")):
        path = resolve_hub_reference(reference, flag, allow_patterns=[*allow_patterns, *PICKLED_WEIGHTS])
    return path


def looks_like_local_path(reference: str) -> bool:
    """True for references a user meant as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``), not a Hub id."""
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1 or os.sep != "/" and os.sep in reference


def resolve_local_path(reference: str | os.PathLike, flag: str) -> Path:
    """An existing local path, or a ResolutionError naming ``flag``."""
    path = Path(reference).expanduser()
    if not path.exists():
        raise ResolutionError(f"{flag}: the local path {str(reference)!r} does not exist.")
    return path


def hub_dataset_commit(reference: str, flag: str, revision: str | None = None) -> str | None:
    """The commit ``revision`` (default: main) of a Hub dataset is at now, or None for a local dataset.

    Reading the rows at this commit, now and in any later ``fifa-hf select``, reads the same rows even if the
    repo moves on. Resolved from the Hub, or from the local cache without a connection (a snapshot directory
    is named by its commit); the reference is checked as ``resolve_hub_reference`` checks it.
    """
    is_local = Path(reference).expanduser().exists() or looks_like_local_path(reference)
    if is_local and revision is not None:
        raise ResolutionError(f"{flag}: {reference!r} is a local dataset; a revision applies to Hub datasets only.")
    snapshot = resolve_hub_reference(
        reference, flag, repo_type="dataset", revision=revision, allow_patterns=["README.md"]
    )
    return None if is_local else Path(snapshot).name  # the cache's snapshots/<commit>, with an owner or without


def resolve_hub_reference(
    reference: str | os.PathLike,
    flag: str,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    download: bool = True,
) -> str:
    """A local directory for ``reference``: the path itself, or the downloaded (or cached) Hub snapshot.

    With ``download=False`` a Hub id is only checked (for datasets that will be streamed) and returned.
    """
    reference = str(reference)
    if Path(reference).expanduser().exists():
        return str(Path(reference).expanduser())
    if looks_like_local_path(reference):
        resolve_local_path(reference, flag)  # raises: the path does not exist
    try:
        validate_repo_id(reference)
    except HFValidationError as error:
        raise ResolutionError(
            f"{flag}: {reference!r} is neither an existing local path nor a Hub repo id (`owner/name`)."
        ) from error
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        path = snapshot_download(
            reference,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=allow_patterns if download else ["README.md"],
            etag_timeout=10,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as error:
        raise ResolutionError(
            f"{flag}: the Hub {kind} {reference!r}{f' at revision {revision!r}' if revision else ''} cannot be "
            f"read ({type(error).__name__}). Check the id and revision, and for a private or gated repo set HF_TOKEN."
        ) from error
    except (LocalEntryNotFoundError, OSError) as error:
        raise ResolutionError(
            f"{flag}: the Hub {kind} {reference!r} cannot be downloaded (no connection to the Hub) and is not in "
            f"the local cache. Download it where there is a network (`hf download {reference}"
            f"{' --repo-type dataset' if kind == 'dataset' else ''}`) and pass its local directory to {flag}, "
            "or run with HF_HUB_OFFLINE=1 once it is cached."
        ) from error
    return str(path) if download else reference
