"""Hub cards: the FiFA subset's dataset card and its margin histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

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


METHOD_DESCRIPTIONS = {
    "fifa": "with **FiFA** (Yang et al., ICLR 2025; our reconstruction, the paper's weights are not public): every\n"
    "pair is scored by `norm(margin) + alpha * norm(quality) + gamma * norm(diversity)` and the top K are kept.",
    "setwise": "with **setwise** selection: pairs whose prompt quality is below `quality_threshold` are gated out,\n"
    "then pairs are taken greedily by z-scored margin (or QSD) minus `diminishing_returns * log(1 + pairs already\n"
    "taken from the same prompt)`, so the subset covers more prompts. Quality and diversity signals as in FiFA\n"
    "(Yang et al., ICLR 2025).",
    "margin": "by preference margin alone (the top K margins), a baseline of FiFA (Yang et al., ICLR 2025).",
    "qsd": "by QSD's quality-aware pair ranking `psi(chosen) * (1 - psi(rejected))`, a baseline of FiFA\n"
    "(Yang et al., ICLR 2025).",
    "random": "at random (seeded), a baseline of FiFA (Yang et al., ICLR 2025).",
}


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
    selection.update(report.selection)
    signals = {
        "reward": f"{config.reward_type}: {config.reward_model}"
        if config.reward_type != "precomputed"
        else f"precomputed: {config.reward_columns}",
        "margin_mode": config.margin_mode,
        "quality": (
            (
                f"{config.quality_scorer}: {config.quality_model}"
                if config.quality_scorer in ("llm", "endpoint")
                else f"{config.quality_scorer} scorer (offline, not an LLM)"
            )
            if config.needs_quality
            else "skipped (alpha = 0)"
        ),
        "diversity": f"{config.embedding_model}, k = {config.knn_k}" if config.needs_diversity else "not used",
    }
    body = f"""# FiFA subset of {source}

The {report.selected} most informative preference pairs of `{source}` (split `{config.split}`), selected
{METHOD_DESCRIPTIONS[config.method]}
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


def diffusion_model_card(
    base_model: str,
    model_id: str,
    is_sdxl: bool,
    is_lora: bool,
    datasets: list[str],
    hyperparameters: dict,
    paper_citation: str,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """The model card of a Diffusion-DPO checkpoint, with a quick start that loads it."""
    tags = ["text-to-image", "diffusers", "stable-diffusion-xl" if is_sdxl else "stable-diffusion"]
    tags += ["lora"] if is_lora else []
    tags += ["diffusion-dpo", "fifa", "trl", *(extra_tags or [])]
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        datasets=datasets or None,
        tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-to-image",
    )
    if is_lora:
        quick_start = f"""from diffusers import DiffusionPipeline

pipeline = DiffusionPipeline.from_pretrained("{base_model}")
pipeline.load_lora_weights("{model_id}")
image = pipeline("a photo of an astronaut riding a horse").images[0]"""
    else:
        quick_start = f"""from diffusers import DiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{model_id}", subfolder="unet")
pipeline = DiffusionPipeline.from_pretrained("{base_model}", unet=unet)
image = pipeline("a photo of an astronaut riding a horse").images[0]"""
    kind = "LoRA adapter for" if is_lora else "fine-tune of"
    rows = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters.items())
    trained_on = ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) or "a preference dataset"
    body = f"""# {model_id}

A Diffusion-DPO {kind} [{base_model}](https://huggingface.co/{base_model}), trained with
[fifa-hf](https://github.com/fifa-hf/fifa-hf) on {trained_on}.

## Quick start

```python
{quick_start}
```

## Training hyperparameters

| hyperparameter | value |
|---|---|
{rows}

## Citations

```bibtex
{paper_citation}

{FIFA_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
