"""Canonical preference pairs: one schema for Pick-a-Pic rows and TRL-style rows.

Every later stage (scoring, selection, training) reads pairs as ``row_id``, ``prompt``, ``chosen``,
``rejected`` (encoded image bytes) and ``tie``. ``row_id`` is the row's index in the source, so a
selected subset can be taken from the untouched source rows. Rows that cannot become a pair are
never lost silently: the map marks them with a ``drop_reason`` and every step reports
``rows_in = rows_kept + sum(dropped)``.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from fifa_hf.images import UNDECODABLE_IMAGE, ImageDecodeError, decode_image, open_image
from fifa_hf.progress import datasets_bars_disabled

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
TRL_COLUMNS = ("prompt", "chosen", "rejected")
PAIR_COLUMNS = ("row_id", "prompt", "chosen", "rejected", "tie", "drop_reason")
SCHEMAS = {"pickapic": PICKAPIC_COLUMNS, "trl": TRL_COLUMNS}

# Reasons a source row does not become a pair.
TIE = "tie"
NO_LABEL = "no_label"
IDENTICAL_IMAGES = "identical_images"
INVALID_LABEL = "invalid_label"
EMPTY_PROMPT = "empty_prompt"
# and UNDECODABLE_IMAGE, IMAGE_TOO_LARGE: defined with the decoder, in fifa_hf.images
VERIFY_SIZE = 64  # images are verified by decoding them whole at (about) this size: cheap, and truncation shows


@dataclass
class RowReport:
    """Rows in, rows kept and rows dropped per reason for one step; the numbers always add up."""

    step: str
    rows_in: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.dropped = {reason: count for reason, count in sorted(self.dropped.items()) if count}
        if self.rows_in != self.rows_kept + sum(self.dropped.values()):
            raise ValueError(f"Row accounting of step {self.step!r} does not add up: {self}")

    @classmethod
    def from_reasons(cls, step: str, reasons: list[str]) -> RowReport:
        """Build a report from one drop reason per row, ``""`` meaning kept."""
        counts = Counter(reasons)
        kept = counts.pop("", 0)
        return cls(step=step, rows_in=len(reasons), rows_kept=kept, dropped=dict(counts))

    def __str__(self) -> str:
        dropped = ", ".join(f"{reason}={count}" for reason, count in self.dropped.items()) or "none"
        return f"{self.step}: {self.rows_in} in, {self.rows_kept} kept, dropped: {dropped}"


def detect_schema(column_names: list[str]) -> str:
    """Return ``"pickapic"`` or ``"trl"``, or raise a ValueError naming the missing columns."""
    columns = set(column_names)
    for name, required in SCHEMAS.items():
        if set(required) <= columns:
            return name
    closest = "pickapic" if "caption" in columns or "jpg_0" in columns else "trl"
    missing = [column for column in SCHEMAS[closest] if column not in columns]
    raise ValueError(
        f"Missing column(s) {missing} for the {closest} schema. Preference data needs either the "
        f"Pick-a-Pic columns {list(PICKAPIC_COLUMNS)} (optional: label_1, has_label, are_different) or "
        f"the TRL columns {list(TRL_COLUMNS)}; got {sorted(columns)}."
    )


def parquet_files(source: str | Path) -> str | list[str] | None:
    """The parquet file(s) ``source`` names: a file, a pattern or a plain directory of them, which hold one split
    whatever name it is asked by (None for anything else)."""
    path = Path(source)
    if path.suffix == ".parquet":
        return str(path)
    if path.is_dir() and not (path / "README.md").exists() and any(path.glob("*.parquet")):
        return sorted(str(p) for p in path.glob("*.parquet"))
    return None


def load_preference_dataset(
    source: str | Path, split: str = "train", streaming: bool = False, **load_kwargs: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """Load raw preference rows from a Hub id, a ``save_to_disk`` directory or parquet file(s) (a file, a
    directory of them or a pattern such as ``data/train-*.parquet``)."""
    path = Path(source)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    files = parquet_files(source)
    if files is not None:
        return datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)
    if not streaming and "data_files" not in load_kwargs:
        # load_dataset prepares every split of a repo to return one (all 335 GB of Pick-a-Pic v2 for its
        # 500-row validation split): give it the split's own files, listed without downloading any.
        files = (datasets.load_dataset_builder(str(source), **load_kwargs).config.data_files or {}).get(split)
        if files:
            load_kwargs = {**load_kwargs, "data_files": {split: list(files)}}
    return datasets.load_dataset(str(source), split=split, streaming=streaming, **load_kwargs)


def image_bytes(value: Any) -> bytes | None:
    """Encoded bytes of an image cell: raw bytes, a ``datasets.Image`` dict or a PIL image."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]).read_bytes() if value.get("path") else None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"Unsupported image value of type {type(value).__name__}")


def image_problem(data: bytes | None, verify: bool = False) -> str:
    """``""`` for a usable image, else the drop reason.

    The default check reads the header only (cheap, for scoring passes that decode every image anyway);
    ``verify=True`` decodes the whole image as training will, so a truncated file is caught here.
    """
    if not data:
        return UNDECODABLE_IMAGE
    try:
        if verify:
            decode_image(data, min_size=VERIFY_SIZE)
        else:
            open_image(data).close()  # parsing the header (and the size it gives) is the check
    except ImageDecodeError as error:
        return error.reason
    return ""


def _label_reason(label_0: Any, label_1: Any, has_label: Any, are_different: Any, drop_ties: bool) -> str:
    if has_label is False:
        return NO_LABEL
    if are_different is False:
        return IDENTICAL_IMAGES
    if label_0 is None or (isinstance(label_0, float) and math.isnan(label_0)) or label_0 not in (0, 0.5, 1):
        return INVALID_LABEL
    if label_1 is not None and label_0 + label_1 != 1:
        return INVALID_LABEL
    if label_0 == 0.5 and drop_ties:
        return TIE
    return ""


def _prompt_text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def row_prompts(dataset: datasets.Dataset) -> list[str]:
    """Each source row's prompt as its pair carries it (Pick-a-Pic's ``caption`` or TRL's ``prompt``, stripped)."""
    column = "caption" if detect_schema(dataset.column_names) == "pickapic" else "prompt"
    return [_prompt_text(prompt) for prompt in dataset[column]]


def orient_pairs(
    batch: dict[str, list],
    indices: list[int],
    schema: str,
    drop_ties: bool = True,
    check_images: bool = True,
    reward_columns: tuple[str, str] | None = None,
    verify_images: bool = False,
) -> dict[str, list]:
    """Batched map function: source rows -> canonical pairs with a ``drop_reason`` (``""`` if kept).

    Pick-a-Pic's ``label_0`` is 1 when image 0 is preferred, 0 when image 1 is, 0.5 for a tie.
    Ties kept with ``drop_ties=False`` keep the source order and are flagged ``tie=True``.
    ``reward_columns`` (precomputed rewards of image 0/1, or of chosen/rejected for TRL rows) are
    oriented the same way into ``reward_chosen`` and ``reward_rejected``. ``check_images`` reads each
    image's header; ``verify_images`` decodes each image whole (see ``image_problem``).
    """
    n = len(indices)
    out: dict[str, list] = {column: [] for column in PAIR_COLUMNS}
    if reward_columns:
        out.update(reward_chosen=[], reward_rejected=[])
    for i in range(n):
        if schema == "pickapic":
            prompt = batch["caption"][i]
            label_0 = batch["label_0"][i]
            reason = _label_reason(
                label_0,
                batch["label_1"][i] if "label_1" in batch else None,
                batch["has_label"][i] if "has_label" in batch else None,
                batch["are_different"][i] if "are_different" in batch else None,
                drop_ties,
            )
            first, second = image_bytes(batch["jpg_0"][i]), image_bytes(batch["jpg_1"][i])
            swap = label_0 == 0
            chosen, rejected = (second, first) if swap else (first, second)
            tie = label_0 == 0.5
        else:
            prompt, reason, tie, swap = batch["prompt"][i], "", False, False
            chosen, rejected = image_bytes(batch["chosen"][i]), image_bytes(batch["rejected"][i])
        if not reason and not _prompt_text(prompt):
            reason = EMPTY_PROMPT
        if not reason and (check_images or verify_images):
            reason = image_problem(chosen, verify_images) or image_problem(rejected, verify_images)
        out["row_id"].append(indices[i])
        out["prompt"].append(_prompt_text(prompt))
        out["chosen"].append(chosen if not reason else None)
        out["rejected"].append(rejected if not reason else None)
        out["tie"].append(bool(tie))
        out["drop_reason"].append(reason)
        if reward_columns:
            rewards = [batch[reward_columns[0]][i], batch[reward_columns[1]][i]]
            out["reward_chosen"].append(rewards[swap])
            out["reward_rejected"].append(rewards[not swap])
    return out


PAIR_FEATURES = datasets.Features(
    {
        "row_id": datasets.Value("int64"),
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("binary"),
        "rejected": datasets.Value("binary"),
        "tie": datasets.Value("bool"),
        "drop_reason": datasets.Value("string"),
    }
)


def _undecoded(dataset: datasets.Dataset | datasets.IterableDataset):
    """Cast ``datasets.Image`` columns to ``decode=False`` so maps see bytes, not decoded pixels."""
    features = dataset.features or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def map_to_pairs(
    dataset: datasets.Dataset | datasets.IterableDataset,
    drop_ties: bool = True,
    check_images: bool = True,
    reward_columns: tuple[str, str] | None = None,
    num_proc: int | None = None,
    batch_size: int = 256,
    verify_images: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Map source rows to canonical pairs, dropped rows included and marked (lazy when streaming)."""
    columns = dataset.column_names
    if columns is None:  # a streamed dataset of unknown features: its first row tells
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError("The dataset is empty: it has no rows (and no columns to check).")
        columns = list(first)
    schema = detect_schema(list(columns))
    missing = [column for column in reward_columns or () if column not in columns]
    if missing:
        raise ValueError(f"Missing precomputed reward column(s) {missing}; got {sorted(columns)}.")
    function = partial(
        orient_pairs, schema=schema, drop_ties=drop_ties, check_images=check_images,
        reward_columns=reward_columns, verify_images=verify_images,
    )  # fmt: skip
    features = PAIR_FEATURES.copy()
    if reward_columns:
        features.update(reward_chosen=datasets.Value("float64"), reward_rejected=datasets.Value("float64"))
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:  # map would not run: no columns to return
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    dataset = _undecoded(dataset)
    kwargs = (
        {"num_proc": num_proc, "desc": "Verifying images" if verify_images else "Orienting preference pairs"}
        if isinstance(dataset, datasets.Dataset)
        else {}
    )
    return dataset.map(
        function,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        **kwargs,
    )


def to_preference_pairs(
    dataset: datasets.Dataset,
    drop_ties: bool = True,
    check_images: bool = True,
    reward_columns: tuple[str, str] | None = None,
    num_proc: int | None = None,
    verify_images: bool = False,
) -> tuple[datasets.Dataset, RowReport]:
    """Canonical pairs of a map-style dataset, with the report of what was dropped and why.

    ``verify_images=True`` decodes every image whole (a trainer's choice: a truncated file is dropped
    and counted here rather than crashing a training step); the default reads headers only.
    """
    marked = map_to_pairs(
        dataset, drop_ties, check_images, reward_columns, num_proc=num_proc, verify_images=verify_images
    )
    report = RowReport.from_reasons("to_preference_pairs", marked["drop_reason"])
    return unmarked(marked).remove_columns("drop_reason"), report


def unmarked(marked: datasets.Dataset) -> datasets.Dataset:
    """The rows of ``map_to_pairs`` output that became pairs (empty ``drop_reason``)."""
    with datasets_bars_disabled():  # a bare "Filter" bar: the pairs' own step shows progress
        return marked.filter(lambda reasons: [not r for r in reasons], input_columns="drop_reason", batched=True)
