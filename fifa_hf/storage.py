"""Resumable, verifiable storage of filter runs: content fingerprints, score parts and atomic outputs.

- ``chunk_digest`` fingerprints the rows a part scored (row ids, prompts, image bytes, labels as
  oriented) and ``model_identity`` the weights a score came from (a Hub commit, or a digest of the
  local files), so a resumed run never mixes scores of other data or other weights with new ones.
- ``ScoreParts`` keeps margin parts that carry their rows' digest in their own parquet metadata: a
  part is reused only when the rows it would score now are the rows it did score, with the same options.
- ``atomic_output_dir`` builds an output directory beside the old one and swaps it in at the end, so
  a directory is always entirely the old output or entirely the new one, whenever a run is killed.
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fifa_hf.errors import InputError

logger = logging.getLogger(__name__)

ROWS_DIGEST_KEY = b"fifa_hf.rows_digest"
OPTIONS_DIGEST_KEY = b"fifa_hf.options_digest"
_HUB_SNAPSHOT = re.compile(r"/(models|datasets|spaces)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(?:/|$)")


class StaleScoresError(InputError):
    """Scores on disk were made with other options than this run's; the message names them and the fix."""


# ---- content fingerprints ------------------------------------------------------------------------
def _update(hasher, value: Any) -> None:
    if isinstance(value, (bytes, bytearray)):
        hasher.update(b"b" + len(value).to_bytes(8, "little"))
        hasher.update(value)
    else:  # None, str, bool, int, float: repr is exact and round-trips
        text = repr(value).encode()
        hasher.update(b"r" + len(text).to_bytes(8, "little") + text)


def chunk_digest(chunk: dict[str, Sequence[Any]]) -> str:
    """SHA-256 of every column of a chunk of canonical pairs (row ids, prompts, image bytes, labels)."""
    hasher = hashlib.sha256()
    for name in sorted(chunk):
        hasher.update(name.encode() + b"\0")
        for value in chunk[name]:
            _update(hasher, value)
    return hasher.hexdigest()


def json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def strict_json(value: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """JSON text with every non-finite float (an undefined statistic) written as ``null``.

    ``json.dumps`` writes NaN and Infinity, which are not JSON: browsers, jq and most other readers reject the file.
    """
    return json.dumps(_finite_or_null(value), indent=indent, default=default, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):  # numpy scalars and arrays, 0-d ones too, as Python values
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


_TREE_DIGESTS: dict[tuple, str] = {}


def _tree_digest(path: Path) -> str:
    """SHA-256 over the names and bytes of a file or of a directory's files (hidden ones skipped).

    Memoized by (name, size, mtime) in this process: the weights of a big model are read once a run.
    """
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted(
            (file.relative_to(path).as_posix(), file)
            for file in path.rglob("*")
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
    key = tuple((name, file.stat().st_size, file.stat().st_mtime_ns) for name, file in files)
    if key not in _TREE_DIGESTS:
        hasher = hashlib.sha256()
        for name, file in files:
            hasher.update(name.encode() + b"\0")
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
        _TREE_DIGESTS[key] = hasher.hexdigest()
    return _TREE_DIGESTS[key]


def model_identity(reference: str | os.PathLike | None, hub_file: str | None = None) -> str | None:
    """What a model's scores depend on: ``owner/name@<commit>`` for a Hub snapshot, ``sha256:<digest of
    the files>`` for a local path, or the reference itself (a remote model name) when nothing is local.

    With ``hub_file``, a Hub id is looked up (in the cache, or on the Hub) to find its commit.
    """
    if reference is None:
        return None
    path = Path(reference).expanduser()
    if not path.exists() and hub_file:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(str(reference), hub_file)).parent
        except Exception:  # not a Hub model (a name an endpoint serves, an open_clip tag): the name is all
            return str(reference)
    if not path.exists():
        return str(reference)
    snapshot = hub_snapshot(path)
    if snapshot:
        return f"{snapshot[0]}@{snapshot[1]}"
    return f"sha256:{_tree_digest(path)}"


def hub_snapshot(path: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, commit) of a path inside a Hugging Face cache snapshot, else None."""
    match = _HUB_SNAPSHOT.search(Path(path).expanduser().absolute().as_posix() + "/")
    return (f"{match.group(2)}/{match.group(3)}", match.group(4)) if match else None


# ---- score parts ---------------------------------------------------------------------------------
class ScoreParts:
    """Margin parts ``part-00000.parquet``, ``part-00001.parquet``, ... of one output directory.

    Each part is written atomically and carries, in its parquet metadata, the digest of the rows it
    scored and of the options that scored them. ``options.json`` records the options, so a run with
    other options is refused with a message naming each difference.
    """

    def __init__(self, directory: str | Path, options: dict[str, Any]):
        self.directory = Path(directory)
        self.options = options
        self.options_digest = json_digest(options)

    def check_options(self) -> None:
        """Refuse parts scored with other options; record this run's options otherwise."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = self.directory / "options.json"
        if record.exists():
            previous = json.loads(record.read_text())
            changed = [
                f"{name}: {previous.get(name)!r} -> {self.options.get(name)!r}"
                for name in sorted(set(previous) | set(self.options))
                if previous.get(name) != self.options.get(name)
            ]
            if changed and any(self.directory.glob("part-*.parquet")):
                raise StaleScoresError(
                    f"{self.directory} holds margins scored with other options ({'; '.join(changed)}). "
                    f"Use another output_dir, or delete {self.directory} to rescore every pair with the new options."
                )
        write_atomically(record, json.dumps(self.options, indent=2, sort_keys=True).encode())

    def path(self, index: int) -> Path:
        return self.directory / f"part-{index:05d}.parquet"

    def load(self, index: int, rows_digest: str) -> pd.DataFrame | None:
        """Part ``index`` if it scored exactly these rows with these options, else None."""
        path = self.path(index)
        if not path.exists():
            return None
        metadata = pq.read_schema(path).metadata or {}
        if metadata.get(ROWS_DIGEST_KEY) != rows_digest.encode():
            return None
        if metadata.get(OPTIONS_DIGEST_KEY) != self.options_digest.encode():
            return None
        return pd.read_parquet(path)

    def exists(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, frame: pd.DataFrame, rows_digest: str) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        metadata = {
            **(table.schema.metadata or {}),
            ROWS_DIGEST_KEY: rows_digest.encode(),
            OPTIONS_DIGEST_KEY: self.options_digest.encode(),
        }
        temporary = self.directory / f".part-{index:05d}.tmp"
        pq.write_table(table.replace_schema_metadata(metadata), temporary)
        os.replace(temporary, self.path(index))

    def remove_from(self, index: int) -> int:
        """Delete the parts from ``index`` on (the source has fewer rows now); returns how many."""
        stale = [path for path in self.directory.glob("part-*.parquet") if int(path.stem.split("-")[1]) >= index]
        for path in stale:
            path.unlink()
        return len(stale)


def write_atomically(path: str | Path, data: bytes) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ---- atomic output directories -------------------------------------------------------------------
def _staging(target: Path) -> Path:
    return target.parent / f".{target.name}.staging"


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _exchange(first: Path, second: Path) -> None:
    """Swap two directories: one ``renameat2(RENAME_EXCHANGE)`` on Linux, three renames elsewhere."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
            return
    side = _previous(second)  # a kill between these renames is undone by recover_output_dir
    os.rename(second, side)
    os.rename(first, second)
    os.rename(side, first)


def recover_output_dir(target: str | Path, keep: Callable[[str], bool]) -> None:
    """Undo what a killed ``atomic_output_dir`` left: bring back the target and the entries it keeps."""
    target = Path(target)
    previous, staging = _previous(target), _staging(target)
    if previous.exists() and not target.exists():
        os.rename(previous, target)
    if staging.exists():
        for entry in staging.iterdir():
            if keep(entry.name) and not (target / entry.name).exists():
                target.mkdir(parents=True, exist_ok=True)
                os.rename(entry, target / entry.name)
                logger.info("Recovered %s from an interrupted write.", target / entry.name)
        shutil.rmtree(staging)


@contextmanager
def atomic_output_dir(target: str | Path, keep: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; when the block ends, it becomes ``target``.

    Entries of the old ``target`` for which ``keep(name)`` is true (resume state: score parts, caches,
    files the user put there) move into the new directory first; the rest of the old output is deleted.
    An exception in the block leaves ``target`` untouched.
    """
    target = Path(target)
    recover_output_dir(target, keep)
    staging = _staging(target)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.rename(staging, target)
        return
    for entry in target.iterdir():
        if keep(entry.name) and not (staging / entry.name).exists():
            os.rename(entry, staging / entry.name)
    _exchange(staging, target)
    shutil.rmtree(staging)  # the old output


def files_matching(folder: str | Path, patterns: Sequence[str]) -> list[Path]:
    """The files under ``folder`` that match any of the glob ``patterns``, each once, sorted; hidden ones (a name
    starting with ".", such as a run's scratch files) never match."""
    folder = Path(folder)
    return sorted(
        {
            path
            for pattern in patterns
            for path in folder.glob(pattern)
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        }
    )


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a top-level entry ``name`` holds files matching one of ``patterns`` (``data/*.parquet`` -> ``data``)."""
    return any(fnmatch.fnmatch(name, pattern.split("/")[0]) for pattern in patterns)
