"""``fifa-hf evaluate``: generate on a fixed prompt set, score with reward models, compare with a baseline."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fifa_hf.errors import InputError
from fifa_hf.evaluation.generation import Generation, GenerationSettings, generate
from fifa_hf.evaluation.prompts import load_prompts
from fifa_hf.evaluation.report import image_grid, markdown_table
from fifa_hf.evaluation.scoring import compare, score
from fifa_hf.progress import quiet_loading
from fifa_hf.resolve import DIFFUSERS_PIPELINE_FILES, LORA_FILES, resolve_hub_reference
from fifa_hf.scoring.rewards import load_reward_model
from fifa_hf.storage import model_identity, strict_json

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class EvaluateArguments:
    """Generate on a fixed prompt set, score with reward models, and compare with a baseline.

    Every model, LoRA, reward checkpoint and Hub prompt dataset is resolved (found locally or downloaded)
    before the first image is generated, so a wrong id fails at once, naming its flag.
    """

    model_name_or_path: str = field(metadata={"help": "Hub id or local pipeline directory (SD1.5 or SDXL)."})
    lora: str | None = field(
        default=None, metadata={"help": "Diffusers-format LoRA (Hub id or local directory) to load on the model."}
    )
    baseline_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Baseline pipeline (Hub id or local directory) for the win rate."}
    )
    baseline_lora: str | None = field(default=None, metadata={"help": "LoRA to load on the baseline."})
    prompts: str = field(
        default="partiprompts",
        metadata={"help": "partiprompts, pickapic, a .txt/.tsv/.jsonl file or <hub dataset>[@split]:<column>."},
    )
    category: str | None = field(default=None, metadata={"help": "PartiPrompts Categories, comma-separated."})
    challenge: str | None = field(default=None, metadata={"help": "PartiPrompts Challenges, comma-separated."})
    max_prompts: int | None = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    reward: str = field(
        default="pickscore",
        metadata={
            "help": "Comma-separated: pickscore, clip:<model>, open_clip:<arch>[:<checkpoint>], "
            "open_clip:local-dir:<dir>, open_clip:hf-hub:<repo>, hpsv2:<checkpoint>, or a registered name "
            "(synthetic)."
        },
    )
    num_images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt (each its own seed)."})
    seed: int = field(default=0, metadata={"help": "Base seed; each prompt's noise derives from it and the prompt."})
    num_inference_steps: int = field(default=30, metadata={"help": "Sampling steps."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    resolution: int | None = field(default=None, metadata={"help": "Image side; default: the pipeline's own."})
    batch_size: int = field(default=4, metadata={"help": "Prompts per pipeline call."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})
    dtype: str = field(default="float32", metadata={"help": "Pipeline dtype: float32, or float16 or bfloat16 on GPU."})
    grid_prompts: int = field(default=4, metadata={"help": "Prompts shown in grid.png."})
    output_dir: str = field(default="evaluation", metadata={"help": "Where images and results are written."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        counts = {"num_images_per_prompt": self.num_images_per_prompt, "batch_size": self.batch_size,
                  "num_inference_steps": self.num_inference_steps, "max_prompts": self.max_prompts}  # fmt: skip
        for name, value in counts.items():
            if value is not None and value < 1:  # max_prompts 0 evaluated every prompt, -3 all but the last 3
                raise ValueError(f"--{name} must be at least 1, got {value}.")

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
    from fifa_hf.pipelines import load_pipeline  # here: scoring saved images must not import diffusers

    with quiet_loading():
        pipeline = load_pipeline(model, torch_dtype=getattr(torch, dtype)).to(device)  # no float32 copy on the device
        if lora:
            pipeline.load_lora_weights(lora)
    return pipeline


@dataclass(frozen=True)
class _Arm:
    """One evaluated model: its name in the outputs and its resolved pipeline and LoRA."""

    name: str
    model: str
    lora: str | None


def _resolve_arm(name: str, model: str, lora: str | None, model_flag: str, lora_flag: str) -> _Arm:
    model_path = resolve_hub_reference(model, model_flag, allow_patterns=DIFFUSERS_PIPELINE_FILES)
    lora_path = resolve_hub_reference(lora, lora_flag, allow_patterns=LORA_FILES) if lora else None
    return _Arm(name, model_path, lora_path)


def _generate(arm: _Arm, prompts: list[str], output_dir: Path, args: EvaluateArguments, device: str):
    pipeline = load_for_evaluation(arm.model, arm.lora, device, args.dtype)
    directory = output_dir / "images" / arm.name
    # By weights (Hub commit or file digest), not path: a LoRA retrained in place must not resume on the old
    # one's images, and no local path is written.
    source = {"model": model_identity(arm.model), "lora": model_identity(arm.lora)}
    generations = generate(
        pipeline,
        prompts,
        directory,
        args.generation_settings(),
        source,
        progress=True,
        desc=f"Generating {arm.name} images",
    )
    record = json.loads((directory / "generation.json").read_text())
    del pipeline
    gc.collect()
    return generations, record


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """Run the evaluation; writes ``results.json``, ``results.md`` and ``grid.png`` under ``output_dir``.

    Models, LoRAs, reward checkpoints and a Hub prompt dataset are resolved first: a reference that cannot
    be used raises ``ResolutionError`` naming its flag before any image is generated.
    """
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    # Cheap checks first: the prompt set, then the reward checkpoints, then the pipelines.
    prompts = load_prompts(args.prompts, _split(args.category), _split(args.challenge), args.max_prompts)
    rewards = [load_reward_model(spec, device=device) for spec in _split(args.reward) or []]
    if not rewards:
        raise InputError("Give at least one reward model with --reward.")
    for reward in rewards:
        reward.resolve("--reward")
    arms = [_resolve_arm("model", args.model_name_or_path, args.lora, "--model_name_or_path", "--lora")]
    if args.baseline_model_name_or_path:
        arms.append(
            _resolve_arm(
                "baseline",
                args.baseline_model_name_or_path,
                args.baseline_lora,
                "--baseline_model_name_or_path",
                "--baseline_lora",
            )
        )
    elif args.baseline_lora:
        raise InputError("--baseline_lora needs --baseline_model_name_or_path (the pipeline to load it on).")

    generated = [_generate(arm, prompts, output_dir, args, device) for arm in arms]
    everything = [g for generations, _ in generated for g in generations]
    # One scoring pass over the model's and the baseline's images: one bar, full batches.
    all_scores = score(everything, rewards, progress=True)
    generations, settings = generated[0]
    scores = {name: values[: len(generations)] for name, values in all_scores.items()}
    baseline_generations, baseline_scores = None, None
    if len(generated) > 1:
        baseline_generations = generated[1][0]
        baseline_scores = {name: values[len(generations) :] for name, values in all_scores.items()}
    results = {
        "arguments": asdict(args),
        "generation": settings,
        "num_prompts": len(prompts),
        "rewards": compare(generations, scores, baseline_generations, baseline_scores),
        "images": _image_records(generations, scores, baseline_generations, baseline_scores),
    }
    (output_dir / "results.json").write_text(strict_json(results, default=str))
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
        f"# Evaluation of `{args['model_name_or_path']}`" + (f" + LoRA `{args['lora']}`" if args["lora"] else ""),
        "",
        f"Baseline: `{args['baseline_model_name_or_path']}`"
        + (f" + LoRA `{args['baseline_lora']}`" if args["baseline_lora"] else "")
        if args["baseline_model_name_or_path"]
        else "No baseline.",
        "",
        f"Prompts: `{args['prompts']}` ({results['num_prompts']} prompts x {args['num_images_per_prompt']} images); "
        f"{generation['scheduler']}, {generation['num_inference_steps']} steps, guidance {generation['guidance_scale']}, "
        f"seed {generation['seed']}.",
        "",
        markdown_table(results["rewards"]),
        "",
        "Intervals: percentile bootstrap of the mean over images, resampling prompts (a prompt's images move "
        "together; 2,000 resamples). Win rate: share of prompts "
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
