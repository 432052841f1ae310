"""``fifa-hf evaluate``: generate on a fixed prompt set, score with reward models, compare with a baseline."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fifa_hf.evaluation.generation import Generation, GenerationSettings, generate
from fifa_hf.evaluation.prompts import load_prompts
from fifa_hf.evaluation.report import image_grid, markdown_table
from fifa_hf.evaluation.scoring import compare, score
from fifa_hf.scoring.rewards import load_reward_model


@dataclass
class EvaluateArguments:
    """Generate on a fixed prompt set, score with reward models, and compare with a baseline."""

    model: str = field(metadata={"help": "Hub id or local pipeline directory (SD1.5 or SDXL)."})
    lora: str | None = field(default=None, metadata={"help": "Diffusers-format LoRA directory to load on the model."})
    baseline: str | None = field(default=None, metadata={"help": "Baseline pipeline for the win rate."})
    baseline_lora: str | None = field(default=None, metadata={"help": "LoRA directory to load on the baseline."})
    prompts: str = field(
        default="partiprompts",
        metadata={"help": "partiprompts, pickapic, a .txt/.tsv/.jsonl file or <hub dataset>[@split]:<column>."},
    )
    category: str | None = field(default=None, metadata={"help": "PartiPrompts Categories, comma-separated."})
    challenge: str | None = field(default=None, metadata={"help": "PartiPrompts Challenges, comma-separated."})
    max_prompts: int | None = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    reward: str = field(
        default="pickscore",
        metadata={"help": "Comma-separated: pickscore, clip:<model>, open_clip:<arch>[:<ckpt>], hpsv2:<ckpt>."},
    )
    num_images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt (each its own seed)."})
    seed: int = field(default=0, metadata={"help": "Base seed; each prompt's noise derives from it and the prompt."})
    num_inference_steps: int = field(default=30, metadata={"help": "Sampling steps."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    resolution: int | None = field(default=None, metadata={"help": "Image side; default: the pipeline's own."})
    batch_size: int = field(default=4, metadata={"help": "Prompts per pipeline call."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})
    dtype: str = field(default="float32", metadata={"help": "Pipeline dtype (float16 or bfloat16 on GPU)."})
    grid_prompts: int = field(default=4, metadata={"help": "Prompts shown in grid.png."})
    output_dir: str = field(default="evaluation", metadata={"help": "Where images and results are written."})

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            num_images_per_prompt=self.num_images_per_prompt,
            seed=self.seed,
            resolution=self.resolution,
            batch_size=self.batch_size,
        )


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def load_for_evaluation(model: str, lora: str | None, device: str, dtype: str):
    """A pipeline on ``device`` in ``dtype``, with a diffusers-format LoRA loaded when given."""
    from fifa_hf.trainer.trainer import load_pipeline

    pipeline = load_pipeline(model).to(device, getattr(torch, dtype))
    if lora:
        pipeline.load_lora_weights(lora)
    return pipeline


def _generate_with(model: str, lora: str | None, prompts, output_dir: Path, args: EvaluateArguments, device: str):
    pipeline = load_for_evaluation(model, lora, device, args.dtype)
    generations = generate(
        pipeline, prompts, output_dir, args.generation_settings(), source={"model": model, "lora": lora}
    )
    record = json.loads((output_dir / "generation.json").read_text())
    del pipeline
    gc.collect()
    return generations, record


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """Run the evaluation; writes ``results.json``, ``results.md`` and ``grid.png`` under ``output_dir``."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    prompts = load_prompts(args.prompts, _split(args.category), _split(args.challenge), args.max_prompts)
    rewards = [load_reward_model(spec, device=device) for spec in _split(args.reward) or []]
    if not rewards:
        raise ValueError("Give at least one reward model with --reward.")

    generations, settings = _generate_with(
        args.model, args.lora, prompts, output_dir / "images" / "model", args, device
    )
    baseline_generations, baseline_scores = None, None
    if args.baseline:
        baseline_generations, _ = _generate_with(
            args.baseline, args.baseline_lora, prompts, output_dir / "images" / "baseline", args, device
        )
    scores = score(generations, rewards)
    if baseline_generations is not None:
        baseline_scores = score(baseline_generations, rewards)
    results = {
        "arguments": asdict(args),
        "generation": settings,
        "num_prompts": len(prompts),
        "rewards": compare(generations, scores, baseline_generations, baseline_scores),
        "images": _image_records(generations, scores, baseline_generations, baseline_scores),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    _write_markdown(output_dir, results)
    _write_grid(output_dir, generations, baseline_generations, args.grid_prompts)
    return results


def _image_records(generations, scores, baseline_generations, baseline_scores) -> list[dict[str, Any]]:
    records = []
    for i, generation in enumerate(generations):
        record = {
            "prompt": generation.prompt,
            "seed": generation.seed,
            "image": generation.path,
            "scores": {name: float(values[i]) for name, values in scores.items()},
        }
        if baseline_generations is not None:
            record["baseline_image"] = baseline_generations[i].path
            record["baseline_scores"] = {name: float(values[i]) for name, values in baseline_scores.items()}
        records.append(record)
    return records


def _write_markdown(output_dir: Path, results: dict[str, Any]) -> None:
    args, generation = results["arguments"], results["generation"]
    lines = [
        f"# Evaluation of `{args['model']}`" + (f" + LoRA `{args['lora']}`" if args["lora"] else ""),
        "",
        f"Baseline: `{args['baseline']}`" + (f" + LoRA `{args['baseline_lora']}`" if args["baseline_lora"] else "")
        if args["baseline"]
        else "No baseline.",
        "",
        f"Prompts: `{args['prompts']}` ({results['num_prompts']} prompts x {args['num_images_per_prompt']} images); "
        f"{generation['scheduler']}, {generation['num_inference_steps']} steps, guidance {generation['guidance_scale']}, "
        f"seed {generation['seed']}.",
        "",
        markdown_table(results["rewards"]),
        "",
        "Intervals: percentile bootstrap of the mean over images (2,000 resamples). Win rate: share of prompts "
        "whose mean score is higher for the model than for the baseline, ties counted as half.",
        "",
        "![model beside baseline](grid.png)",
    ]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")


def _write_grid(
    output_dir: Path, generations: list[Generation], baseline: list[Generation] | None, count: int
) -> None:
    # Model and baseline come from the same prompts and settings, so their generations align by position.
    shown = [i for i, g in enumerate(generations) if g.image_index == 0][:count]
    if not shown:
        return
    rows = [[generations[i].image()] + ([baseline[i].image()] if baseline else []) for i in shown]
    labels = ["model", "baseline"] if baseline else ["model"]
    image_grid(rows, [generations[i].prompt for i in shown], labels).save(output_dir / "grid.png")
