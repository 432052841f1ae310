"""Hub cards: the FiFA subset's dataset card (with its figures) and the Diffusion-DPO model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from fifa_hf.redact import published_reference

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


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SIGNALS = {
    "margin": "preference margin: reward(chosen) - reward(rejected)",
    "quality": "prompt quality (0-1)",
    "diversity": "prompt diversity: log distance to the k-th neighbour",
}


def signal_histograms(scores: pd.DataFrame, path: str | Path) -> Path:
    """PNG histograms of each signal (margin, quality, diversity) of all scored pairs vs the selected ones."""
    plt = _matplotlib()
    pool = scores[scores["drop_reason"] == ""]
    shown = [c for c in SIGNALS if c in pool and np.isfinite(pool[c].to_numpy(dtype=float)).any()] or ["margin"]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.2), squeeze=False)
    for axis, column in zip(axes[0], shown):
        values = pool[column].to_numpy(dtype=float) if column in pool else np.zeros(0)
        values = values[np.isfinite(values)]
        selected = pool.loc[pool["selected"], column].to_numpy(dtype=float) if column in pool else np.zeros(0)
        selected = selected[np.isfinite(selected)]
        edges = np.histogram_bin_edges(values, bins=30) if len(values) else np.linspace(0, 1, 11)
        for name, sample in ((f"all pairs ({len(values)})", values), (f"selected ({len(selected)})", selected)):
            density = np.histogram(sample, bins=edges, density=True)[0] if len(sample) else np.zeros(len(edges) - 1)
            axis.stairs(density, edges, fill=True, alpha=0.5, label=name)
        axis.set_xlabel(SIGNALS[column], fontsize=8)
        axis.locator_params(axis="x", nbins=5)
        axis.legend(fontsize=7)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.95, wspace=0.25)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def pairs_grid(subset, path: str | Path, num_pairs: int = 4, size: int = 192) -> Path | None:
    """PNG of the first (best) pairs of a subset, one row each: the chosen image left, the rejected one
    right, the prompt above them. Drawn with PIL: no plotting needed for a few images."""
    from PIL import Image, ImageDraw, ImageOps

    from fifa_hf.data import to_preference_pairs
    from fifa_hf.images import decode_image

    rows = subset.select(range(min(num_pairs, len(subset))))
    pairs, _ = to_preference_pairs(rows, drop_ties=False, check_images=False)
    if not len(pairs):
        return None
    header, gap = 18, 6
    grid = Image.new("RGB", (2 * size + 3 * gap, len(pairs) * (size + header + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for index, pair in enumerate(pairs):
        top = gap + index * (size + header + gap)
        prompt = pair["prompt"] if len(pair["prompt"]) <= 60 else pair["prompt"][:57] + "..."
        draw.text((gap, top), prompt, fill="black")
        for column, left in (("chosen", gap), ("rejected", 2 * gap + size)):
            try:
                image = ImageOps.contain(decode_image(pair[column], min_size=size), (size, size))
                grid.paste(image, (left + (size - image.width) // 2, top + header + (size - image.height) // 2))
            except ValueError:
                draw.text((left + gap, top + header + size // 2), "undecodable image", fill="red")
            draw.text((left + 2, top + header + 2), column, fill="lime" if column == "chosen" else "red")
    grid.save(path)
    return Path(path)


METHOD_NAMES = {"setwise": "Setwise", "fifa": "FiFA", "margin": "Margin-ranked", "qsd": "QSD", "random": "Random"}
# How each method chose, completing "Selected ...".
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

DATASET_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

{{ summary }} Rows keep the source columns (so existing Diffusion-DPO scripts read them), plus `margin`,
`quality`, `diversity`, `fifa_score` (the selection method's score) and `rank` (0 = best).

```python
from datasets import load_dataset

subset = load_dataset("{{ repo_id }}", split="train")
```
{% if pairs_figure %}
## Example pairs

The best-ranked pairs: the image people preferred (chosen) left, the other (rejected) right.

![Example chosen and rejected pairs]({{ pairs_figure }})
{% endif %}
## How the pairs were chosen

Selected {{ method_description }}

Signals:

```yaml
{{ signals }}
```

Selection settings (FiFA's paper does not publish alpha, gamma or k; these are the values used here):

```yaml
{{ selection }}
```

The full configuration is in `fifa_config.yaml`, every pair's scores (no images) in `scores.parquet`.

![Signals of all scored pairs vs the selected ones]({{ histograms_figure }})

## Counts

| | pairs |
|---|---|
| source rows | {{ rows_in }} |
{% for reason, count in dropped.items() %}| dropped: {{ reason }} | {{ count }} |
{% endfor %}| scored pairs | {{ rows_kept }} |
{% for reason, count in not_selected.items() %}| not selected: {{ reason }} | {{ count }} |
{% endfor %}| **selected pairs** | **{{ selected }}** |
| unique prompts (scored / selected) | {{ unique_prompts }} / {{ unique_prompts_selected }} |

## Citation

```bibtex
{{ citations }}
```
"""


def dataset_card(
    config, report, license: str, repo_id: str | None = None, figures: dict[str, str] | None = None
) -> DatasetCard:
    """The subset's README.md, from ``DatasetCardData`` and a template: metadata, the method really used,
    the configuration, example pairs, signal histograms, counts by reason and citations.

    ``repo_id`` is the Hub repo the subset is pushed to; without one the card loads the local directory.
    Paths are written as ``fifa_hf.hub.published_reference`` makes them (never absolute).
    """
    figures = figures or {}
    source = published_reference(config.dataset_name) or "local data"
    read_from = f"`{source}` at commit `{config.dataset_revision}`" if config.dataset_revision else f"`{source}`"
    data = DatasetCardData(
        license=license,
        task_categories=["text-to-image"],
        source_datasets=[source],
        size_categories=[size_category(report.selected)],
        tags=list(dict.fromkeys(["fifa", "preference", "human-feedback", "diffusion-dpo", "dpo", config.method])),
        pretty_name=f"{METHOD_NAMES.get(config.method, config.method)} subset of {source}",
    )  # no `configs`: data/train-*.parquet is found by name, and with them datasets caches a local directory by
    # its card, so that load_dataset(output_dir) would return an earlier run's rows after a rewrite
    method = METHOD_DESCRIPTIONS.get(config.method, f"by the `{config.method}` selection method.")
    k = config.selection_k
    if report.selected >= report.rows_kept:
        summary = (
            f"All {report.selected} scored preference pairs of {read_from} (split `{config.split}`): k = {k:g} "
            "is at or above the number of scored pairs, so nothing was filtered out by the selection."
        )
    else:
        summary = (
            f"{report.selected} of the {report.rows_kept} scored preference pairs of {read_from} "
            f"(split `{config.split}`), selected by {METHOD_NAMES.get(config.method, config.method)}."
        )
    signals = {
        "reward": f"{config.reward_type}: {published_reference(config.reward_model)}"
        if config.reward_type != "precomputed"
        else f"precomputed: {config.reward_columns}",
        "margin_mode": config.margin_mode,
        "quality": _quality_description(config),
        "diversity": f"{published_reference(config.embedding_model)}, k = {config.knn_k}"
        if config.needs_diversity
        else "not used",
    }
    selection = {**report.selection, "max_pairs_per_prompt": config.max_pairs_per_prompt}
    return DatasetCard.from_template(
        data,
        template_str=DATASET_CARD_TEMPLATE,
        summary=summary,
        repo_id=repo_id or published_reference(str(Path(config.output_dir).absolute())),
        method_description=method,
        signals=yaml.safe_dump(signals, sort_keys=False).strip(),
        selection=yaml.safe_dump(selection, sort_keys=False).strip(),
        pairs_figure=figures.get("pairs"),
        histograms_figure=figures.get("histograms", "signal_histograms.png"),
        rows_in=report.rows_in,
        dropped=report.dropped,
        rows_kept=report.rows_kept,
        not_selected=report.not_selected,
        selected=report.selected,
        unique_prompts=report.unique_prompts,
        unique_prompts_selected=report.unique_prompts_selected,
        citations=f"{FIFA_CITATION}\n\n{PICKAPIC_CITATION}",
    )


def _quality_description(config) -> str:
    if not config.needs_quality:
        return "skipped (alpha = 0)"
    if config.quality_scorer in ("offline", "heuristic"):
        return f"{config.quality_scorer} scorer (offline, not an LLM)"
    if config.quality_scorer == "endpoint":
        return (
            f"endpoint: {config.quality_model} (timeout {config.quality_timeout:g} s, "
            f"{config.quality_max_retries} retries, {config.quality_concurrency} concurrent requests)"
        )
    return f"llm: {published_reference(config.quality_model)}"


DIFFUSION_DPO_PAPER = "https://huggingface.co/papers/2311.12908"
FIFA_PAPER = "https://huggingface.co/papers/2410.10166"


def _quick_start(base_model: str, base_is_local: bool, model_id: str, is_lora: bool) -> str:
    base = f'"{base_model}"' + ("  # the base model's local directory" if base_is_local else "")
    if is_lora:
        return f"""from diffusers import DiffusionPipeline

pipeline = DiffusionPipeline.from_pretrained({base})
pipeline.load_lora_weights("{model_id}")
image = pipeline("a photo of an astronaut riding a horse").images[0]"""
    return f"""from diffusers import DiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{model_id}", subfolder="unet")
pipeline = DiffusionPipeline.from_pretrained({base}, unet=unet)
image = pipeline("a photo of an astronaut riding a horse").images[0]"""


def _results_table(results: dict[str, dict[str, float]]) -> str:
    if not results:
        return "No metrics were logged."
    names = list(dict.fromkeys(key.removeprefix("eval_") for metrics in results.values() for key in metrics))
    rows = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split, metrics in results.items():
        values = [metrics.get(name, metrics.get(f"eval_{name}")) for name in names]
        cells = ["" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        rows.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def diffusion_model_card(
    model_id: str,
    base_model: str,
    base_model_id: str | None,
    is_sdxl: bool,
    is_lora: bool,
    hyperparameters: dict,
    paper_citation: str,
    license: str = "other",
    datasets: list[str] | None = None,
    local_datasets: list[str] | None = None,
    tags: list[str] | None = None,
    results: dict[str, dict[str, float]] | None = None,
    framework_versions: dict[str, str] | None = None,
    samples: list[tuple[str, str]] | None = None,
    sample_grid: str | None = None,
    grid_shows_base: bool = True,
    fifa_subset: bool = False,
) -> ModelCard:
    """The model card of a Diffusion-DPO checkpoint, built on ``huggingface_hub.ModelCardData``.

    ``model_id`` is the real repo id (or the output directory's name), ``base_model`` how the base model is
    shown and ``base_model_id`` its Hub id, None for a local model (no metadata, no link). ``datasets`` are Hub
    ids (metadata and links), ``local_datasets`` names of local ones (named, never linked). ``samples`` are
    (prompt, image file) pairs for the widget; ``sample_grid`` the grid's file, the base model's row above this
    model's unless ``grid_shows_base`` is False (no reference to sample: a full SFT run). ``fifa_subset``:
    the training pairs were selected by ``fifa-hf filter`` (the card says so only then).
    """
    card_tags = ["text-to-image", "diffusers", "stable-diffusion-xl" if is_sdxl else "stable-diffusion"]
    card_tags += ["lora"] if is_lora else []
    data = ModelCardData(
        license=license,
        library_name="diffusers",
        base_model=base_model_id,
        datasets=list(datasets or []) or None,
        tags=list(dict.fromkeys([*card_tags, *(tags or [])])),
        pipeline_tag="text-to-image",
        widget=[{"text": prompt, "output": {"url": url}} for prompt, url in samples or []] or None,
    )
    kind = "LoRA adapter for" if is_lora else "fine-tune of"
    base = (
        f"[{base_model_id}](https://huggingface.co/{base_model_id})"
        if base_model_id
        else f"`{base_model}` (a local model)"
    )
    trained_on = [f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets or []]
    trained_on += [f"`{d}` (a local dataset)" for d in local_datasets or []]
    rows = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters.items())
    versions = "\n".join(f"- {name}: {version}" for name, version in (framework_versions or {}).items())
    grid_caption = "Top row: the base model; bottom row: this model" if grid_shows_base else "This model's samples"
    grid = (
        f"\n## Samples\n\n{grid_caption} (same prompts and seeds).\n\n![Samples of the card prompts]({sample_grid})\n"
        if sample_grid
        else ""
    )
    selection = f", a subset of preference pairs selected with [FiFA]({FIFA_PAPER})" if fifa_subset else ""
    body = f"""# {model_id}

A [Diffusion-DPO]({DIFFUSION_DPO_PAPER}) {kind} {base}, trained with fifa-hf on
{", ".join(trained_on) or "a preference dataset"}{selection}.

## Quick start

```python
{_quick_start(base_model_id or base_model, base_model_id is None, model_id, is_lora)}
```
{grid}
## Training results

{_results_table(results or {})}

## Training hyperparameters

| hyperparameter | value |
|---|---|
{rows}

## Framework versions

{versions}

## Citations

- Diffusion-DPO: Wallace et al., *Diffusion Model Alignment Using Direct Preference Optimization*, CVPR 2024
  ([paper]({DIFFUSION_DPO_PAPER})).
- FiFA: Yang et al., *Automated Filtering of Human Feedback Data for Aligning Text-to-Image Diffusion Models*,
  ICLR 2025 ([paper]({FIFA_PAPER})).

```bibtex
{paper_citation}

{FIFA_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
