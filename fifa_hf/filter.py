"""The FiFA filter: source rows -> canonical pairs -> margins (chunked, resumable) -> quality and
diversity (once per unique prompt, cached) -> selection -> the subset, with full row accounting.

Margins are computed chunk by chunk over a stream and written as parquet parts without images, so
memory stays bounded whatever the dataset size and an interrupted run resumes at the first missing
part. Prompt scores live in a SQLite cache, so a resumed run never asks the LLM twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from fifa_hf.data import RowReport, load_preference_dataset, map_to_pairs, unmarked
from fifa_hf.scoring import (
    CLIPRewardModel,
    EndpointQualityScorer,
    HeuristicQualityScorer,
    MarginScorer,
    OfflineQualityScorer,
    OpenCLIPRewardModel,
    PrecomputedReward,
    PromptEmbedder,
    ScoreCache,
    TransformersQualityScorer,
    add_prompt_signals,
)
from fifa_hf.scoring.diversity import DEFAULT_EMBEDDING_MODEL
from fifa_hf.scoring.margin import MARGIN_COLUMNS
from fifa_hf.scoring.rewards import PICKSCORE_MODEL
from fifa_hf.selection import (
    DEFAULT_DIMINISHING_RETURNS,
    DEFAULT_METHOD,
    DEFAULT_QUALITY_THRESHOLD,
    METHODS,
    NORMALIZATIONS,
    SETWISE_BASES,
    select,
)

logger = logging.getLogger(__name__)

QUALITY_FAILED = "quality_failed"
SCORE_COLUMNS = ("row_id", "prompt", "tie", "drop_reason", *MARGIN_COLUMNS)


@dataclass
class FiFAConfig:
    """Configuration of the FiFA filter.

    Parameters that control the data: ``dataset``, ``split``, ``streaming``, ``drop_ties``.
    Parameters that control the signals: ``reward_*`` and ``margin_mode`` (margin), ``quality_*``
    (quality), ``embedding_model``, ``knn_k`` and ``knn_method`` (diversity).
    Parameters that control the selection: ``method``, ``k``, ``alpha``, ``gamma``, ``normalization``,
    ``max_pairs_per_prompt``, ``seed``. The paper publishes no alpha, gamma or k; the defaults weigh
    the three z-scored signals equally.
    """

    dataset: str | None = field(
        default=None, metadata={"help": "Hub id, `save_to_disk` directory or parquet file(s)."}
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
        metadata={"help": "Reward model id or path (open_clip: architecture or `local-dir:`)."},
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
        default=None, metadata={"help": "Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1."}
    )
    quality_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key."}
    )
    quality_concurrency: int = field(default=8, metadata={"help": "Concurrent endpoint requests."})

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
            "help": "Pairs to keep: a count (>= 1) or a fraction of the scored pairs (< 1). Default: 5000, or the top 5.33% for qsd."
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

    batch_size: int = field(default=64, metadata={"help": "Pairs per reward-model batch."})
    chunk_size: int = field(default=4096, metadata={"help": "Pairs per resumable scoring part."})
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for the margin map (one GPU each with several GPUs)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for the models (default: cuda if available)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, float16 or bfloat16."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Prompt-score cache directory (default: output_dir/cache)."}
    )
    license: str | None = field(default=None, metadata={"help": "License for the card when the source declares none."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Dataset repo id (user/name) to publish the subset to."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self):
        choices = {
            "reward_type": ("clip", "open_clip", "precomputed"),
            "margin_mode": ("signed", "absolute"),
            "quality_scorer": ("llm", "endpoint", "offline", "heuristic"),
            "knn_method": ("auto", "exact", "ivf"),
            "method": METHODS,
            "normalization": NORMALIZATIONS,
            "setwise_base": SETWISE_BASES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.reward_type == "precomputed" and len(self.reward_column_pair or ()) != 2:
            raise ValueError("reward_type='precomputed' needs reward_columns='column_0,column_1'.")
        if self.quality_scorer == "endpoint" and self.needs_quality and not self.quality_endpoint:
            raise ValueError("quality_scorer='endpoint' needs quality_endpoint.")

    @property
    def reward_column_pair(self) -> tuple[str, str] | None:
        if not self.reward_columns:
            return None
        return tuple(c.strip() for c in self.reward_columns.split(","))  # type: ignore[return-value]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FiFAConfig:
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown FiFAConfig key(s) in {path}: {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build_reward_model(self):
        if self.reward_type == "precomputed":
            return PrecomputedReward(*self.reward_column_pair)
        if self.reward_type == "open_clip":
            return OpenCLIPRewardModel(self.reward_model, self.reward_pretrained, self.device, self.dtype)
        return CLIPRewardModel(self.reward_model, self.reward_processor, self.device, self.dtype)

    @property
    def needs_quality(self) -> bool:
        """Quality is scored when FiFA weighs it or setwise gates on it."""
        return bool(self.alpha) or self.method == "setwise"

    def build_quality_scorer(self):
        if not self.needs_quality:
            return None
        if self.quality_scorer == "heuristic":
            return HeuristicQualityScorer()
        if self.quality_scorer == "offline":
            return OfflineQualityScorer(device=self.device)
        if self.quality_scorer == "endpoint":
            return EndpointQualityScorer(
                self.quality_endpoint, self.quality_model, api_key_env=self.quality_api_key_env,
                concurrency=self.quality_concurrency,
            )  # fmt: skip
        return TransformersQualityScorer(self.quality_model, device=self.device, dtype=self.dtype)

    @property
    def needs_diversity(self) -> bool:
        """Diversity is embedded only when FiFA weighs it; no other method reads it."""
        return bool(self.gamma) and self.method == "fifa"

    def build_embedder(self):
        return PromptEmbedder(self.embedding_model, device=self.device) if self.needs_diversity else None


@dataclass
class FilterReport:
    """Row accounting through every step plus what the selection kept."""

    steps: list[RowReport] = field(default_factory=list)
    selected: int = 0
    unique_prompts: int = 0
    unique_prompts_selected: int = 0
    quality_cached: int = 0
    quality_scored: int = 0
    resumed_rows: int = 0
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)

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
            "unique_prompts": self.unique_prompts,
            "unique_prompts_selected": self.unique_prompts_selected,
            "quality_cached": self.quality_cached,
            "quality_scored": self.quality_scored,
            "resumed_rows": self.resumed_rows,
            "steps": [asdict(step) for step in self.steps],
            "score_summary": self.score_summary,
            "selection": self.selection,
        }

    def __str__(self) -> str:
        lines = [str(step) for step in self.steps]
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


class FiFAFilter:
    """Runs normalize -> score (with the caches) -> select and returns the subset and its report."""

    def __init__(
        self, config: FiFAConfig, reward_model=None, quality_scorer=None, embedder=None, progress: bool = True
    ):
        self.config = config
        self.progress = progress  # False: no progress bars (a caller running many filters shows its own)
        self.reward_model = reward_model or config.build_reward_model()
        self.quality_scorer = quality_scorer if quality_scorer is not None else config.build_quality_scorer()
        self.embedder = embedder if embedder is not None else config.build_embedder()
        self.output_dir = Path(config.output_dir)

    # ---- scoring -------------------------------------------------------------------------------
    def _scoring_fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {
            "dataset": c.dataset, "split": c.split, "drop_ties": c.drop_ties, "reward_type": c.reward_type,
            "reward_model": c.reward_model, "reward_processor": c.reward_processor,
            "reward_pretrained": c.reward_pretrained, "reward_columns": c.reward_columns,
            "margin_mode": c.margin_mode, "chunk_size": c.chunk_size,
        }  # fmt: skip

    def score_margins(self, source: datasets.Dataset | datasets.IterableDataset) -> tuple[pd.DataFrame, int]:
        """Margins of every source row (dropped rows included, with their reason), resumable by part."""
        parts = self.output_dir / "scores_parts"
        parts.mkdir(parents=True, exist_ok=True)
        fingerprint_file = parts / "fingerprint.json"
        fingerprint = self._scoring_fingerprint()
        if fingerprint_file.exists() and json.loads(fingerprint_file.read_text()) != fingerprint:
            raise ValueError(
                f"{parts} holds scores made with another configuration; delete it or use another output_dir."
            )
        fingerprint_file.write_text(json.dumps(fingerprint, indent=2))
        done = sorted(parts.glob("part-*.parquet"))
        resumed = len(done) * self.config.chunk_size
        if isinstance(source, datasets.Dataset):
            source = source.to_iterable_dataset()
        marked = map_to_pairs(source, drop_ties=self.config.drop_ties, reward_columns=self.config.reward_column_pair)
        if resumed:
            marked = marked.skip(resumed)
            logger.info("Resuming after %d scored rows (%d parts).", resumed, len(done))
        scorer = MarginScorer(self.reward_model, absolute=self.config.margin_mode == "absolute")
        index = len(done)
        progress = tqdm(desc="Scoring margins", unit="pairs", initial=resumed, disable=not self.progress)
        for chunk in marked.iter(batch_size=self.config.chunk_size):
            table = datasets.Dataset.from_dict(chunk)
            scored = unmarked(table).map(
                scorer, batched=True, batch_size=self.config.batch_size, with_rank=True,
                num_proc=self.config.num_proc, remove_columns=["chosen", "rejected"], desc=None,
            ).to_pandas()  # fmt: skip
            dropped = pd.DataFrame({name: chunk[name] for name in ("row_id", "prompt", "tie", "drop_reason")})
            dropped = dropped[dropped["drop_reason"] != ""].assign(
                reward_chosen=np.nan, reward_rejected=np.nan, margin=np.nan, margin_error=""
            )
            frame = pd.concat([scored, dropped]).sort_values("row_id")[list(SCORE_COLUMNS)]
            temporary = parts / f".part-{index:05d}.tmp"
            frame.to_parquet(temporary, index=False)
            os.replace(temporary, parts / f"part-{index:05d}.parquet")
            index += 1
            progress.update(len(table))
        progress.close()
        files = sorted(parts.glob("part-*.parquet"))
        frames = [pd.read_parquet(f) for f in files]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCORE_COLUMNS)), resumed

    def score(self, source) -> tuple[pd.DataFrame, FilterReport]:
        """All signals for every row, and the accounting; rows that cannot be scored are kept with a reason."""
        report = FilterReport()
        scores, report.resumed_rows = self.score_margins(source)
        report.steps.append(RowReport.from_reasons("to_preference_pairs", scores["drop_reason"].tolist()))
        margin_failed = (scores["drop_reason"] == "") & ~np.isfinite(scores["margin"].to_numpy(dtype=float))
        reasons = scores["margin_error"].str.split(":").str[0].where(scores["margin_error"] != "", "missing_reward")
        scores.loc[margin_failed, "drop_reason"] = reasons[margin_failed]
        report.steps.append(self._step("margin", scores, before=margin_failed | (scores["drop_reason"] == "")))

        kept = scores["drop_reason"] == ""
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
            scores.loc[failed, "drop_reason"] = QUALITY_FAILED
            report.steps.append(self._step("quality", scores, before=kept))
        return scores, report

    @staticmethod
    def _step(name: str, scores: pd.DataFrame, before: pd.Series) -> RowReport:
        return RowReport.from_reasons(name, scores.loc[before, "drop_reason"].tolist())

    def select(self, scores: pd.DataFrame) -> pd.DataFrame:
        return apply_selection(scores, self.config)

    # ---- running -------------------------------------------------------------------------------
    def run(self, source: datasets.Dataset | datasets.IterableDataset | None = None) -> FilterResult:
        """Score, select and write ``output_dir`` (subset parquet, scores parquet, card, config, report)."""
        from fifa_hf.hub import write_subset

        raw = source if source is not None else self.load_source()
        scores, report = self.score(raw)
        scores = self.select(scores)
        subset = materialize_subset(raw, scores)
        finish_report(report, scores, self.config)
        write_subset(self.output_dir, subset, scores, report, self.config)
        return FilterResult(subset, scores, report, self.config)

    def load_source(self):
        if not self.config.dataset:
            raise ValueError("FiFAConfig.dataset is not set and no dataset was passed to run().")
        return load_preference_dataset(self.config.dataset, self.config.split, streaming=self.config.streaming)


def apply_selection(scores: pd.DataFrame, config: FiFAConfig) -> pd.DataFrame:
    """Add ``fifa_score`` (the method's score), ``selected`` and ``rank`` (0 = best) to a scores table.

    Needs no model: ``fifa-hf select`` re-runs it on saved scores with other settings in seconds.
    """
    scores = scores.copy()
    kept = scores.index[scores["drop_reason"] == ""]
    pool = scores.loc[kept]
    names = ("row_id", "prompt", "margin", "reward_chosen", "reward_rejected", "quality", "diversity")
    columns = {name: pool[name].to_numpy() for name in names if name in pool}
    positions, method_scores = select(
        columns, config.method, config.k, config.alpha, config.gamma, config.normalization,
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
    """Select again from a filter run's saved scores (``fifa-hf select``): no model is loaded."""
    from fifa_hf.hub import write_subset

    scores_dir = Path(scores_dir)
    config = FiFAConfig.from_yaml(scores_dir / "fifa_config.yaml", output_dir=str(output_dir), **overrides)
    scores = apply_selection(pd.read_parquet(scores_dir / "scores.parquet"), config)
    previous = json.loads((scores_dir / "report.json").read_text())
    report = FilterReport(
        steps=[RowReport(**step) for step in previous["steps"]],
        unique_prompts=previous["unique_prompts"],
        quality_cached=previous["quality_cached"],
        quality_scored=previous["quality_scored"],
    )
    raw = load_preference_dataset(config.dataset, config.split, streaming=config.streaming)
    subset = materialize_subset(raw, scores)
    finish_report(report, scores, config)
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
    selected = scores[scores["selected"]]
    report.selected = len(selected)
    report.unique_prompts_selected = selected["prompt"].nunique()
    report.selection = selection_settings(config, scores)
    summary = {}
    for column in ("margin", "quality", "diversity", "fifa_score"):
        if column in scores:
            for name, frame in (("all", scores[scores["drop_reason"] == ""]), ("selected", selected)):
                values = frame[column].to_numpy(dtype=float)
                values = values[np.isfinite(values)]  # setwise scores pairs below its quality gate NaN
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
        for index, row in enumerate(tqdm(raw, desc="Collecting selected rows", unit="rows")):
            if index in wanted:
                found[index] = row
                if len(found) == len(wanted):
                    break
        subset = datasets.Dataset.from_list([found[i] for i in row_ids], features=raw.features)
    for column in SUBSET_SCORE_COLUMNS:
        if column in selected and column not in subset.column_names:
            values = selected[column].to_numpy()
            subset = subset.add_column(column, values.tolist())
    return subset
