"""Hub cards: the FiFA subset's dataset card and its margin histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from huggingface_hub import DatasetCard, DatasetCardData

FIFA_CITATION = """@inproceedings{yang2025fifa,
  title     = {Automated Filtering of Human Feedback Data for Aligning Text-to-Image Diffusion Models},
  author    = {Yang, Yongjin and Kim, Sihyeon and Jung, Hojung and Bae, Sangmin and Kim, SangMook and Yun, Se-Young and Lee, Kimin},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  note      = {arXiv:2410.10166}
}"""
PICKAPIC_CITATION = """@inproceedings{kirstain2023pickapic,
  title     = {Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation},
  author    = {Kirstain, Yuval and Polyak, Adam and Singer, Uriel and Matiana, Shahbuland and Penna, Joe and Levy, Omer},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}"""


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M" if n < 10_000_000 else "10M<n<100M"


def margin_histogram(scores: pd.DataFrame, path: str | Path) -> Path:
    """PNG histogram of the preference margins of all scored pairs vs the selected ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = scores[scores["drop_reason"] == ""]
    margins = kept["margin"].to_numpy(dtype=float)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(margins, bins=40) if len(margins) else 10
    axis.hist(margins, bins=bins, density=True, alpha=0.5, label=f"all pairs ({len(kept)})")
    selected = kept[kept["selected"]]["margin"].to_numpy(dtype=float)
    axis.hist(selected, bins=bins, density=True, alpha=0.6, label=f"selected ({len(selected)})")
    axis.set_xlabel("preference margin: reward(chosen) - reward(rejected)")
    axis.set_ylabel("density")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def dataset_card(config, report, license: str) -> DatasetCard:
    """The subset's README.md: Hub metadata, the configuration used, the counts and the citations."""
    source = config.dataset or "local data"
    data = DatasetCardData(
        license=license,
        task_categories=["text-to-image"],
        source_datasets=[source],
        size_categories=[size_category(report.selected)],
        tags=["fifa", "preference", "human-feedback", "diffusion-dpo", "dpo"],
        pretty_name=f"FiFA subset of {source}",
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    )
    dropped = "\n".join(f"| dropped: {reason} | {count} |" for reason, count in report.dropped.items())
    selection = {key: getattr(config, key) for key in ("method", "k", "alpha", "gamma", "normalization", "knn_k")}
    signals = {
        "reward": f"{config.reward_type}: {config.reward_model}"
        if config.reward_type != "precomputed"
        else f"precomputed: {config.reward_columns}",
        "margin_mode": config.margin_mode,
        "quality": f"{config.quality_scorer}: {config.quality_model}" if config.alpha else "skipped (alpha = 0)",
        "diversity": f"{config.embedding_model}, k = {config.knn_k}" if config.gamma else "skipped (gamma = 0)",
    }
    body = f"""# FiFA subset of {source}

The {report.selected} most informative preference pairs of `{source}` (split `{config.split}`), selected
with **FiFA** (Yang et al., ICLR 2025): every pair is scored by
`norm(margin) + alpha * norm(quality) + gamma * norm(diversity)` and the top K are kept.
Rows keep the source columns (so existing Diffusion-DPO scripts read them), plus `margin`, `quality`,
`diversity`, `fifa_score` and `rank` (0 = best).

```python
from datasets import load_dataset

subset = load_dataset("<this repo>", split="train")
```

## Configuration

Signals:

```yaml
{yaml.safe_dump(signals, sort_keys=False).strip()}
```

Selection (the paper does not publish alpha, gamma or k; these are the values used here):

```yaml
{yaml.safe_dump(selection, sort_keys=False).strip()}
```

The full configuration is in `fifa_config.yaml`, every pair's scores (no images) in `scores.parquet`.

## Counts

| | pairs |
|---|---|
| source rows | {report.rows_in} |
{dropped}
| scored pairs | {report.rows_kept} |
| selected pairs | {report.selected} |
| unique prompts (scored / selected) | {report.unique_prompts} / {report.unique_prompts_selected} |

![Margins of all vs selected pairs](margin_histogram.png)

## Citation

```bibtex
{FIFA_CITATION}

{PICKAPIC_CITATION}
```
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
