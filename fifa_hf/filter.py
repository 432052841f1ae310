"""The FiFA filter: source rows -> canonical pairs -> margins (chunked, resumable) -> quality and
diversity (once per unique prompt, cached) -> selection -> the subset, with full row accounting.

Every model and the dataset are resolved before any work. Margins are computed chunk by chunk over
a stream and written as parts without images (``fifa_hf.storage.ScoreParts``), so memory stays
bounded whatever the dataset size; a re-run reuses a part only when the rows it scored and the
options that scored them are unchanged, and rescores it otherwise. Prompt scores live in a SQLite
cache keyed by the scorer's weights, so a resumed run never asks the LLM twice. The output directory
is replaced as a whole at the end (``fifa_hf.hub.write_subset``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from fifa_hf.data import RowReport, load_preference_dataset, map_to_pairs, row_prompts, unmarked
from fifa_hf.errors import InputError
from fifa_hf.hub import LOCAL_SOURCE_FILE, check_output_dir, create_dataset_repo, is_resume_state, write_subset
from fifa_hf.images import DECODER_VERSION
from fifa_hf.progress import datasets_bars_disabled
from fifa_hf.resolve import ResolutionError, hub_dataset_commit
from fifa_hf.scoring import MarginScorer, ScoreCache, add_prompt_signals
from fifa_hf.scoring.builders import build_embedder, build_quality_scorer, build_reward_model, resolve_models
from fifa_hf.scoring.diversity import DEFAULT_EMBEDDING_MODEL
from fifa_hf.scoring.margin import MARGIN_COLUMNS, MarginWorkers
from fifa_hf.scoring.rewards import PICKSCORE_MODEL
from fifa_hf.selection import (
    DEFAULT_DIMINISHING_RETURNS,
    DEFAULT_METHOD,
    DEFAULT_QUALITY_THRESHOLD,
    METHODS,
    NORMALIZATIONS,
    SETWISE_BASES,
    default_k,
    resolve_k,
    select,
)
from fifa_hf.storage import ScoreParts, chunk_digest, recover_output_dir

logger = logging.getLogger(__name__)

QUALITY_FAILED = "quality_failed"
SCORE_COLUMNS = ("row_id", "prompt", "tie", "drop_reason", *MARGIN_COLUMNS)
# Keys of older configurations (fifa_config.yaml files, recipes) and what they are called now.
RENAMED_KEYS = {"dataset": "dataset_name", "private": "hub_private_repo"}


@dataclass
class FiFAConfig:
    """Configuration of the FiFA filter.

    Parameters that control the data: ``dataset_name``, ``split``, ``streaming``, ``drop_ties``.
    Parameters that control the signals: ``reward_*`` and ``margin_mode`` (margin), ``quality_*``
    (quality), ``embedding_model``, ``knn_k`` and ``knn_method`` (diversity).
    Parameters that control the selection: ``method``, ``k``, ``alpha``, ``gamma``, ``normalization``,
    ``max_pairs_per_prompt``, ``seed``, ``strict``. The paper publishes no alpha, gamma or k; the
    defaults weigh the three z-scored signals equally.
    Parameters that control the output: ``output_dir``, ``license``, ``push_to_hub``, ``hub_model_id``,
    ``hub_private_repo`` (TRL's names; the token is read from ``HF_TOKEN``, else ``hf auth login``'s).

    Renamed: ``dataset`` is now ``dataset_name`` (``--dataset`` still works on the command line) and
    ``private`` is ``hub_private_repo``; ``from_yaml`` (``fifa-hf select`` on older outputs) maps the old
    keys, a ``--config`` recipe must be edited.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, `save_to_disk` directory or parquet file(s) of the source rows.",
            "aliases": ["--dataset"],  # its former name
        },
    )
    dataset_revision: str | None = field(
        default=None,
        metadata={
            "help": "Branch, tag or commit of a Hub dataset_name (default: main). The commit read is recorded in "
            "fifa_config.yaml and the card, and `fifa-hf select` reads the same one."
        },
    )
    split: str = field(default="train", metadata={"help": "Split to filter."})
    streaming: bool = field(default=False, metadata={"help": "Stream the source instead of downloading it whole."})
    drop_ties: bool = field(default=True, metadata={"help": "Drop pairs labelled as ties (label_0 == 0.5)."})
    output_dir: str = field(default="fifa_output", metadata={"help": "Where the subset, scores and card are written."})

    reward_type: str = field(
        default="clip", metadata={"help": "clip (PickScore and any transformers CLIP), open_clip or precomputed."}
    )
    reward_model: str = field(
        default=PICKSCORE_MODEL,
        metadata={"help": "Reward model id or path (open_clip: architecture, `local-dir:<path>` or `hf-hub:<id>`)."},
    )
    reward_processor: str | None = field(
        default=None, metadata={"help": "CLIP processor id; PickScore's default is laion/CLIP-ViT-H-14."}
    )
    reward_pretrained: str | None = field(default=None, metadata={"help": "open_clip checkpoint path or tag."})
    reward_columns: str | None = field(
        default=None, metadata={"help": "precomputed: two comma-separated columns (image 0,image 1)."}
    )
    margin_mode: str = field(
        default="signed", metadata={"help": "signed: reward(chosen) - reward(rejected); absolute: its magnitude."}
    )

    quality_scorer: str = field(
        default="llm",
        metadata={
            "help": "llm (local transformers chat model), endpoint (OpenAI-compatible), offline (MiniLM, word "
            "frequencies and a harm detector, no LLM; needs the demo extra) or heuristic (crude offline fallback)."
        },
    )
    quality_model: str = field(
        default="Qwen/Qwen2.5-1.5B-Instruct",
        metadata={"help": "Chat model id or path (llm), or the model name sent to the endpoint."},
    )
    quality_endpoint: str | None = field(
        default=None,
        metadata={"help": "Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 (never published)."},
    )
    quality_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key."}
    )
    quality_concurrency: int = field(default=8, metadata={"help": "Concurrent endpoint requests."})
    quality_timeout: float = field(default=30.0, metadata={"help": "Seconds before an endpoint request times out."})
    quality_max_retries: int = field(
        default=3, metadata={"help": "Retries of a failed or unparseable endpoint request (with backoff)."}
    )

    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "sentence-transformers model for prompt embeddings."}
    )
    knn_k: int = field(
        default=5, metadata={"help": "k of the k-NN entropy estimate (our default; not given in the paper)."}
    )
    knn_method: str = field(default="auto", metadata={"help": "auto, exact or ivf."})

    method: str = field(
        default=DEFAULT_METHOD,
        metadata={
            "help": f"Selection method: {', '.join(METHODS)}. setwise (the default, chosen by the rule of "
            "docs/selection.md): quality gate, then margin with per-prompt diminishing returns; fifa: the paper's "
            "score as we reconstruct it."
        },
    )
    k: float | None = field(
        default=None,
        metadata={
            "help": "Pairs to keep: a count (>= 1) or a fraction of the scored pairs (< 1). "
            "Default: 5000, or the top 5.33 percent for qsd."
        },
    )
    alpha: float = field(
        default=1.0, metadata={"help": "fifa: weight of prompt quality (0 skips the LLM unless setwise gates on it)."}
    )
    gamma: float = field(default=1.0, metadata={"help": "fifa: weight of prompt diversity (0 skips the embeddings)."})
    normalization: str = field(
        default="zscore", metadata={"help": f"Signal normalization: {', '.join(NORMALIZATIONS)}."}
    )
    quality_threshold: float = field(
        default=DEFAULT_QUALITY_THRESHOLD,
        metadata={"help": "setwise: the quality gate; pairs whose prompt quality is below it are never selected."},
    )
    diminishing_returns: float = field(
        default=DEFAULT_DIMINISHING_RETURNS,
        metadata={
            "help": "setwise: lambda of the per-prompt diminishing returns; a pair is worth its z-scored base "
            "score minus lambda * log(1 + pairs already taken from its prompt). 0: plain ranking after the gate."
        },
    )
    setwise_base: str = field(
        default="margin", metadata={"help": f"setwise: the base pair score, {' or '.join(SETWISE_BASES)}."}
    )
    max_pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "Optional cap on selected pairs per prompt."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})
    strict: bool = field(default=False, metadata={"help": "Fail, rather than warn, when k keeps every scored pair."})

    batch_size: int = field(default=64, metadata={"help": "Pairs per reward-model batch."})
    chunk_size: int = field(default=4096, metadata={"help": "Pairs per resumable scoring part."})
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes scoring margins, one per GPU; each loads the reward model once."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for the models (default: cuda if available)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, float16 or bfloat16."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Prompt-score cache directory (default: output_dir/cache)."}
    )
    license: str | None = field(default=None, metadata={"help": "License for the card when the source declares none."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the subset as a Hub dataset repo."})
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Dataset repo to push to (`user/name`, or `name` in your namespace); default: output_dir's name."
        },
    )
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the repo private (default: the Hub's default for you or your org)."}
    )

    def __post_init__(self):
        choices = {
            "reward_type": ("clip", "open_clip", "precomputed"),
            "margin_mode": ("signed", "absolute"),
            "quality_scorer": ("llm", "endpoint", "offline", "heuristic"),
            "knn_method": ("auto", "exact", "ivf"),
            "method": METHODS,
            "normalization": NORMALIZATIONS,
            "setwise_base": SETWISE_BASES,
            "dtype": ("float32", "float16", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.reward_type == "precomputed" and len(self.reward_column_pair or ()) != 2:
            raise ValueError("reward_type='precomputed' needs reward_columns='column_0,column_1'.")
        if self.quality_scorer == "endpoint" and self.needs_quality and not self.quality_endpoint:
            raise ValueError("quality_scorer='endpoint' needs quality_endpoint.")
        if self.quality_timeout <= 0 or self.quality_max_retries < 0 or self.quality_concurrency < 1:
            raise ValueError("quality_timeout must be > 0, quality_max_retries >= 0 and quality_concurrency >= 1.")
        if self.k is not None:
            resolve_k(self.k, 1)  # its error names k and the values it takes
        for name in ("knn_k", "batch_size", "chunk_size", "max_pairs_per_prompt", "num_proc"):
            value = getattr(self, name)  # the last two may be None (no cap, no worker processes)
            if value is not None and (not float(value).is_integer() or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        for name in ("alpha", "gamma", "quality_threshold", "diminishing_returns"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}.")

    @property
    def selection_k(self) -> float:
        """``k``, or the method's default when it is None (``fifa_hf.selection.default_k``)."""
        return self.k if self.k is not None else default_k(self.method)

    @property
    def needs_quality(self) -> bool:
        """Quality is scored when FiFA weighs it or setwise gates on it; no other method reads it."""
        return (bool(self.alpha) and self.method == "fifa") or self.method == "setwise"

    @property
    def needs_diversity(self) -> bool:
        """Diversity is embedded only when FiFA weighs it; no other method reads it."""
        return bool(self.gamma) and self.method == "fifa"

    @property
    def reward_column_pair(self) -> tuple[str, str] | None:
        if not self.reward_columns:
            return None
        return tuple(c.strip() for c in self.reward_columns.split(","))  # type: ignore[return-value]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FiFAConfig:
        values = yaml.safe_load(Path(path).read_text()) or {}
        for old, new in RENAMED_KEYS.items():
            if old in values:
                logger.warning("%s: the key %r is now called %r.", path, old, new)
                values.setdefault(new, values.pop(old))
        if isinstance(values.get("push_to_hub"), str):  # once the repo id; now a flag beside hub_model_id
            values.setdefault("hub_model_id", values["push_to_hub"])
            values["push_to_hub"] = True
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown FiFAConfig key(s) in {path}: {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FilterReport:
    """Row accounting through every step, how much was resumed, and what the selection kept and why."""

    steps: list[RowReport] = field(default_factory=list)
    selected: int = 0
    unique_prompts: int = 0
    unique_prompts_selected: int = 0
    quality_cached: int = 0
    quality_scored: int = 0
    resumed_rows: int = 0
    rescored_rows: int = 0
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    not_selected: dict[str, int] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        return self.steps[0].rows_in if self.steps else 0

    @property
    def rows_kept(self) -> int:
        return self.steps[-1].rows_kept if self.steps else 0

    @property
    def dropped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for step in self.steps:
            for reason, count in step.dropped.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "dropped": self.dropped,
            "selected": self.selected,
            "not_selected": self.not_selected,
            "unique_prompts": self.unique_prompts,
            "unique_prompts_selected": self.unique_prompts_selected,
            "quality_cached": self.quality_cached,
            "quality_scored": self.quality_scored,
            "resumed_rows": self.resumed_rows,
            "rescored_rows": self.rescored_rows,
            "steps": [asdict(step) for step in self.steps],
            "score_summary": self.score_summary,
            "selection": self.selection,
        }

    def __str__(self) -> str:
        lines = [str(step) for step in self.steps]
        if self.resumed_rows or self.rescored_rows:
            lines.append(
                f"resumed: margins of {self.resumed_rows} rows reused, {self.rescored_rows} rescored "
                "(their source rows changed)"
            )
        lines.append(f"selected {self.selected} of {self.rows_kept} pairs ({self.unique_prompts_selected} prompts)")
        if "gated_out" in self.selection:
            lines.append(
                f"quality gate (quality >= {self.selection['quality_threshold']}) removed "
                f"{self.selection['gated_out']} pairs before selection"
            )
        return "\n".join(lines)


@dataclass
class FilterResult:
    subset: datasets.Dataset
    scores: pd.DataFrame
    report: FilterReport
    config: FiFAConfig


def _num_rows(source: datasets.Dataset | datasets.IterableDataset, split: str) -> int | None:
    """The number of source rows when it is known without reading them (a progress bar's total)."""
    if isinstance(source, datasets.Dataset):
        return len(source)
    try:
        return int(source.info.splits[split].num_examples) or None
    except (AttributeError, KeyError, TypeError):
        return None


class FiFAFilter:
    """Runs normalize -> score (with the caches) -> select and returns the subset and its report.

    Every model not passed in is resolved when the filter is built (a missing model fails here, not
    after the margins); the dataset is resolved when ``run`` starts.
    """

    def __init__(
        self, config: FiFAConfig, reward_model=None, quality_scorer=None, embedder=None, progress: bool = True
    ):
        self.config = config
        self.progress = progress  # False: no progress bars (a caller running many filters shows its own)
        self.output_dir = Path(config.output_dir)
        check_output_dir(self.output_dir, config.dataset_name)
        if config.push_to_hub:
            config.hub_model_id = create_dataset_repo(config.hub_model_id, config.output_dir, config.hub_private_repo)
        self.resolved = resolve_models(
            config, reward=reward_model is None, quality=quality_scorer is None, embedding=embedder is None
        )
        self.reward_model = reward_model if reward_model is not None else build_reward_model(config, self.resolved)
        self.quality_scorer = (
            quality_scorer if quality_scorer is not None else build_quality_scorer(config, self.resolved)
        )
        self.embedder = embedder if embedder is not None else build_embedder(config, self.resolved)

    # ---- scoring -------------------------------------------------------------------------------
    def scoring_options(self) -> dict[str, Any]:
        """Every option a margin depends on, with models by weights (Hub commit or file digest)."""
        c = self.config
        return {
            "reward_type": c.reward_type, "reward": self.reward_model.identity, "reward_columns": c.reward_columns,
            "margin_mode": c.margin_mode, "dtype": c.dtype, "drop_ties": c.drop_ties, "chunk_size": c.chunk_size,
            "image_decoding": f"fifa_hf.images v{DECODER_VERSION}, reduced to the reward model's input size",
        }  # fmt: skip

    def score_margins(self, source: datasets.Dataset | datasets.IterableDataset) -> tuple[pd.DataFrame, Counter]:
        """Margins of every source row (dropped rows included, with their reason), resumable by part.

        Returns the scores and how many rows were ``reused`` from parts, ``rescored`` because their
        rows changed since, and ``scored`` for the first time.
        """
        parts = ScoreParts(self.output_dir / "scores_parts", self.scoring_options())
        parts.check_options()
        total = _num_rows(source, self.config.split)
        if isinstance(source, datasets.Dataset):
            source = source.to_iterable_dataset()
        marked = map_to_pairs(source, drop_ties=self.config.drop_ties, reward_columns=self.config.reward_column_pair)
        scorer = MarginScorer(self.reward_model, absolute=self.config.margin_mode == "absolute")
        workers = MarginWorkers(scorer, self.config.batch_size, self.config.num_proc)
        counts: Counter = Counter()
        frames, index = [], 0
        bar = tqdm(total=total, desc="Scoring preference margins", unit="pairs", disable=not self.progress)
        with datasets_bars_disabled(), bar, workers:
            for index, chunk in enumerate(marked.iter(batch_size=self.config.chunk_size)):
                digest, rows = chunk_digest(chunk), len(chunk["row_id"])
                frame = parts.load(index, digest)
                if frame is not None:
                    counts["reused"] += rows
                else:
                    if parts.exists(index):
                        counts["rescored"] += rows
                        logger.warning("Rows %d-%d changed since they were scored; rescoring them.",
                                       chunk["row_id"][0], chunk["row_id"][-1])  # fmt: skip
                    else:
                        counts["scored"] += rows
                    frame = self._score_chunk(chunk, marked.features, workers)
                    parts.save(index, frame, digest)
                frames.append(frame)
                bar.update(rows)
        removed = parts.remove_from(index + 1 if frames else 0)
        if counts["reused"] or counts["rescored"] or removed:
            logger.info(
                "Resumed from %s: margins of %d rows reused, %d rescored (changed), %d scored; %d stale parts removed.",
                parts.directory, counts["reused"], counts["rescored"], counts["scored"], removed,
            )  # fmt: skip
        scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCORE_COLUMNS))
        return scores, counts

    def _score_chunk(self, chunk: dict[str, list], features, workers: MarginWorkers) -> pd.DataFrame:
        table = unmarked(datasets.Dataset.from_dict(chunk, features=features))
        frames = [workers(table)] if len(table) else []
        dropped = pd.DataFrame({name: chunk[name] for name in ("row_id", "prompt", "tie", "drop_reason")})
        dropped = dropped[dropped["drop_reason"] != ""]
        if len(dropped):
            frames.append(dropped.assign(reward_chosen=np.nan, reward_rejected=np.nan, margin=np.nan, margin_error=""))
        return pd.concat(frames).sort_values("row_id")[list(SCORE_COLUMNS)].reset_index(drop=True)

    def score(self, source) -> tuple[pd.DataFrame, FilterReport]:
        """All signals for every row, and the accounting; rows that cannot be scored are kept with a reason."""
        report = FilterReport()
        scores, counts = self.score_margins(source)
        report.resumed_rows, report.rescored_rows = counts["reused"], counts["rescored"]
        report.steps.append(RowReport.from_reasons("to_preference_pairs", scores["drop_reason"].tolist()))
        margin_failed = (scores["drop_reason"] == "") & ~np.isfinite(scores["margin"].to_numpy(dtype=float))
        scores.loc[margin_failed, "drop_reason"] = _reason(scores["margin_error"], "missing_reward")[margin_failed]
        report.steps.append(self._step("margin", scores, before=margin_failed | (scores["drop_reason"] == "")))

        kept = scores["drop_reason"] == ""
        if not len(scores):
            raise InputError(f"The source has no rows (split {self.config.split!r}). Nothing was written.")
        if not kept.any():  # nothing to select from: do not replace an output with an empty subset
            errors = scores["margin_error"].fillna("")
            example = errors[errors != ""].iloc[0] if (errors != "").any() else scores["drop_reason"].iloc[0]
            raise InputError(
                f"None of the {len(scores)} source rows became a scored pair "
                f"({scores['drop_reason'].value_counts().to_dict()}), e.g. {example}. Nothing was written. Check the "
                "source's labels and images, and the reward model or --reward_columns."
            )
        cache = ScoreCache(Path(self.config.cache_dir or self.output_dir / "cache") / "quality.sqlite")
        signals = datasets.Dataset.from_pandas(scores.loc[kept, ["row_id", "prompt"]], preserve_index=False)
        signals, stats = add_prompt_signals(
            signals,
            self.quality_scorer,
            self.embedder,
            k=self.config.knn_k,
            cache=cache,
            knn_method=self.config.knn_method,
        )
        report.unique_prompts = stats.unique_prompts
        report.quality_cached, report.quality_scored = stats.quality_cached, stats.quality_scored
        for column in ("quality", "quality_error", "diversity"):
            if column in signals.column_names:
                scores.loc[kept, column] = signals[column]
        if "quality" in signals.column_names:
            failed = kept & ~np.isfinite(scores["quality"].to_numpy(dtype=float))
            scores.loc[failed, "drop_reason"] = _reason(scores["quality_error"], QUALITY_FAILED)[failed]
            report.steps.append(self._step("quality", scores, before=kept))
            if kept.any() and failed[kept].all():  # a broken scorer, not bad prompts: do not write an empty subset
                raise InputError(
                    f"Quality scoring failed for all {int(kept.sum())} scored pairs "
                    f"({dict(report.steps[-1].dropped)}), e.g. {scores.loc[failed, 'quality_error'].iloc[0]}. "
                    f"Nothing was written. Fix --quality_scorer {self.config.quality_scorer} and run again: the "
                    "margins are reused."
                )
        return scores, report

    @staticmethod
    def _step(name: str, scores: pd.DataFrame, before: pd.Series) -> RowReport:
        return RowReport.from_reasons(name, scores.loc[before, "drop_reason"].tolist())

    def select(self, scores: pd.DataFrame) -> pd.DataFrame:
        return apply_selection(scores, self.config)

    # ---- running -------------------------------------------------------------------------------
    def run(self, source: datasets.Dataset | datasets.IterableDataset | None = None) -> FilterResult:
        """Score, select and write ``output_dir`` (subset parquet, scores parquet, card, config, report)."""
        raw = source if source is not None else self.load_source()
        recover_output_dir(self.output_dir, is_resume_state)
        scores, report = self.score(raw)
        scores = self.select(scores)
        finish_report(report, scores, self.config)
        subset = materialize_subset(raw, scores)
        write_subset(self.output_dir, subset, scores, report, self.config)
        return FilterResult(subset, scores, report, self.config)

    def load_source(self):
        if not self.config.dataset_name:
            raise ValueError("FiFAConfig.dataset_name is not set and no dataset was passed to run().")
        rows, commit = load_source(
            self.config.dataset_name, self.config.split, self.config.streaming, self.config.dataset_revision
        )
        self.config.dataset_revision = commit  # what fifa_config.yaml and the card record, and select reads
        return rows


def load_source(
    dataset_name: str, split: str, streaming: bool, revision: str | None = None
) -> tuple[datasets.Dataset | datasets.IterableDataset, str | None]:
    """The source rows and, for a Hub dataset, the commit they were read at.

    The reference is checked first: a missing local path or Hub repo fails at once.
    """
    if glob.has_magic(dataset_name):  # parquet files by pattern
        if revision is not None:
            raise ResolutionError("--dataset_revision applies to Hub datasets; --dataset_name is a file pattern.")
        if not glob.glob(os.path.expanduser(dataset_name)):
            raise ResolutionError(f"--dataset_name: no file matches {dataset_name!r}.")
        commit = None
    else:
        commit = hub_dataset_commit(dataset_name, "--dataset_name", revision)
    if commit is None:  # local rows
        return load_preference_dataset(os.path.expanduser(dataset_name), split, streaming=streaming), None
    return load_preference_dataset(dataset_name, split, streaming=streaming, revision=commit), commit


def _reason(errors: pd.Series, default: str) -> pd.Series:
    """The reason category of each error text (``undecodable_image: ...`` -> ``undecodable_image``)."""
    errors = errors.fillna("").astype(str)
    return errors.str.split(":").str[0].where(errors != "", default)


def apply_selection(scores: pd.DataFrame, config: FiFAConfig) -> pd.DataFrame:
    """Add ``fifa_score`` (the method's score), ``selected`` and ``rank`` (0 = best) to a scores table.

    Needs no model: ``fifa-hf select`` re-runs it on saved scores with other settings in seconds. A
    ``k`` that keeps every scored pair filters nothing: it is warned about (an error with ``strict``).
    """
    needed = {"quality": config.needs_quality, "diversity": config.needs_diversity}
    missing = [signal for signal, needs in needed.items() if needs and signal not in scores]
    if missing:
        raise InputError(
            f"--method {config.method} reads {' and '.join(missing)}, which these scores do not hold: the run that "
            f"made them did not need it. Run `fifa-hf filter --method {config.method}` into the same output "
            "directory (its margins are reused)."
        )
    scores = scores.copy()
    kept = scores.index[scores["drop_reason"] == ""]
    pool = scores.loc[kept]
    k = config.selection_k
    if len(pool) and resolve_k(k, len(pool)) >= len(pool):
        message = f"k={k:g} keeps all {len(pool)} scored pairs: nothing is filtered out."
        if config.strict:
            raise ValueError(f"{message} Lower k (strict mode).")
        logger.warning(message)
    names = ("row_id", "prompt", "margin", "reward_chosen", "reward_rejected", "quality", "diversity")
    columns = {name: pool[name].to_numpy() for name in names if name in pool}
    positions, method_scores = select(
        columns, config.method, k, config.alpha, config.gamma, config.normalization,
        config.max_pairs_per_prompt, config.seed, config.quality_threshold, config.diminishing_returns,
        config.setwise_base,
    )  # fmt: skip
    scores["fifa_score"] = np.nan
    scores.loc[kept, "fifa_score"] = method_scores
    scores["selected"] = False
    scores["rank"] = -1
    chosen = kept[positions]
    scores.loc[chosen, "selected"] = True
    scores.loc[chosen, "rank"] = np.arange(len(positions))
    return scores


def reselect(scores_dir: str | Path, output_dir: str | Path, **overrides: Any) -> FilterResult:
    """Select again from a filter run's saved scores (``fifa-hf select``): no model is loaded.

    The source rows are read from ``dataset_name`` if given, else from where the filter read them.
    """
    scores_dir = Path(scores_dir)
    missing = [
        name for name in ("fifa_config.yaml", "scores.parquet", "report.json") if not (scores_dir / name).exists()
    ]
    if missing:
        raise InputError(
            f"--scores {scores_dir} is not the output directory of a finished `fifa-hf filter` run (it has no "
            f"{', '.join(missing)})."
        )
    try:
        config = FiFAConfig.from_yaml(scores_dir / "fifa_config.yaml", output_dir=str(output_dir), **overrides)
    except ValueError as error:  # a setting given to select that the config refuses
        raise InputError(str(error)) from error
    local_source = scores_dir / LOCAL_SOURCE_FILE
    if overrides.get("dataset_name") is None and local_source.exists():
        config.dataset_name = json.loads(local_source.read_text())["dataset_name"]
    elif overrides.get("dataset_name") is not None and "dataset_revision" not in overrides:
        config.dataset_revision = None  # the recorded commit is the filtered dataset's, not this one's
    check_output_dir(output_dir, config.dataset_name)
    scores = apply_selection(pd.read_parquet(scores_dir / "scores.parquet"), config)  # bad settings fail here
    raw, config.dataset_revision = load_source(
        config.dataset_name, config.split, config.streaming, config.dataset_revision
    )
    previous = json.loads((scores_dir / "report.json").read_text())
    report = FilterReport(
        steps=[RowReport(**step) for step in previous["steps"]],
        unique_prompts=previous["unique_prompts"],
        quality_cached=previous["quality_cached"],
        quality_scored=previous["quality_scored"],
    )
    finish_report(report, scores, config)
    subset = materialize_subset(raw, scores)
    write_subset(output_dir, subset, scores, report, config)
    return FilterResult(subset, scores, report, config)


def selection_settings(config: FiFAConfig, scores: pd.DataFrame) -> dict[str, Any]:
    """The settings the chosen method used, and for setwise how many scored pairs its gate removed."""
    names = {
        "fifa": ("alpha", "gamma", "normalization", "knn_k"),
        "setwise": ("quality_threshold", "diminishing_returns", "setwise_base", "quality_scorer"),
        "random": ("seed",),
    }.get(config.method, ())
    settings = {"method": config.method, "k": config.k, **{name: getattr(config, name) for name in names}}
    if config.method == "setwise":
        kept = scores["drop_reason"] == ""
        settings["gated_out"] = int((kept & scores["fifa_score"].isna()).sum())
    return settings


def finish_report(report: FilterReport, scores: pd.DataFrame, config: FiFAConfig) -> None:
    """The selection's settings, why scored pairs were not selected (setwise's quality gate, held back by
    ``max_pairs_per_prompt``, below the cut) and score summaries."""
    pool = scores[scores["drop_reason"] == ""]
    selected = pool[pool["selected"]]
    report.selected = len(selected)
    report.unique_prompts_selected = selected["prompt"].nunique()
    report.selection = selection_settings(config, scores)
    rest = pool[~pool["selected"]]
    gated = rest["fifa_score"].isna()  # setwise scores the pairs below its quality gate NaN
    capped = pd.Series(False, index=rest.index)
    if config.max_pairs_per_prompt and len(selected):
        # Left out only because its prompt was full: a pair scoring at least as well as the last one kept, or
        # any pair at all when the cap stopped the selection short of K (no pair was below a cut then).
        full = selected["prompt"].value_counts()
        full = set(full[full >= config.max_pairs_per_prompt].index)
        short_of_k = len(selected) < resolve_k(config.selection_k, len(pool))
        capped = (
            rest["prompt"].isin(full) & ~gated & ((rest["fifa_score"] >= selected["fifa_score"].min()) | short_of_k)
        )
    counts = {"quality_gate": int(gated.sum()), "max_pairs_per_prompt": int(capped.sum())}
    counts["below_cutoff"] = len(rest) - sum(counts.values())
    report.not_selected = {reason: count for reason, count in counts.items() if count}
    summary = {}
    for column in ("margin", "quality", "diversity", "fifa_score"):
        if column in scores:
            for name, frame in (("all", pool), ("selected", selected)):
                values = frame[column].to_numpy(dtype=float)
                values = values[np.isfinite(values)]
                if len(values):
                    summary.setdefault(column, {})[name] = {
                        "mean": float(np.mean(values)), "std": float(np.std(values)),
                        "min": float(np.min(values)), "max": float(np.max(values)),
                    }  # fmt: skip
    report.score_summary = summary


SUBSET_SCORE_COLUMNS = ("reward_chosen", "reward_rejected", "margin", "quality", "diversity", "fifa_score", "rank")


def materialize_subset(raw: datasets.Dataset | datasets.IterableDataset, scores: pd.DataFrame) -> datasets.Dataset:
    """The selected source rows, untouched, best first, with the score columns appended."""
    selected = scores[scores["selected"]].sort_values("rank")
    row_ids = selected["row_id"].to_numpy()
    if isinstance(raw, datasets.Dataset):
        subset = raw.select(row_ids)
    else:
        wanted = set(row_ids.tolist())
        found = {}
        last = int(row_ids.max()) + 1 if len(row_ids) else 0
        for index, row in enumerate(tqdm(raw, desc="Collecting the selected rows", unit="rows", total=last)):
            if index in wanted:
                found[index] = row
                if len(found) == len(wanted):
                    break
        subset = datasets.Dataset.from_list([found[i] for i in row_ids], features=raw.features)
    check_rows_match(subset, selected)
    with datasets_bars_disabled():
        for column in SUBSET_SCORE_COLUMNS:
            if column in selected and column not in subset.column_names:
                values = selected[column].to_numpy()
                subset = subset.add_column(column, values.tolist())
    return subset


def check_rows_match(subset: datasets.Dataset, selected: pd.DataFrame) -> None:
    """Refuse source rows that are not the ones scored (another dataset, or one that changed since)."""
    differ = [
        (row_id, found, scored)
        for row_id, found, scored in zip(selected["row_id"], row_prompts(subset), selected["prompt"])
        if found != scored
    ]
    if differ:
        row_id, found, scored = differ[0]
        raise InputError(
            f"The source rows are not the ones that were scored: {len(differ)} of {len(selected)} selected rows "
            f"differ, e.g. row {row_id} has the prompt {found!r} in the source and {scored!r} in the scores. Pass "
            "the dataset that was filtered (--dataset_name), or filter this one anew."
        )
