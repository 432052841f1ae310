"""Generate images for a prompt set with fixed per-prompt seeds, resumably.

Every (prompt, image index) gets a seed derived from the prompt text and the base seed, and its
initial noise is drawn on the CPU, so two pipelines with the same latent shape start from the same
noise on any device: the model and its baseline differ only in what they learned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from fifa_hf.errors import InputError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


@dataclass(frozen=True)
class Generation:
    """One generated image: which prompt, which seed, where it is saved."""

    prompt: str
    prompt_index: int
    image_index: int
    seed: int
    path: str

    def image(self) -> Image.Image:
        with Image.open(self.path) as image:
            return image.convert("RGB")


def prompt_seed(prompt: str, seed: int, image_index: int) -> int:
    """A 31-bit seed fixed by the prompt, the base seed and the image index (not the prompt's position)."""
    digest = hashlib.sha256(f"{seed}\0{image_index}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _file_name(prompt: str, image_index: int, seed: int) -> str:
    return f"{hashlib.sha1(prompt.encode()).hexdigest()[:12]}_{image_index}_{seed}.png"


@dataclass(frozen=True)
class GenerationSettings:
    """What results depend on; recorded next to every set of images."""

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    num_images_per_prompt: int = 1
    seed: int = 0
    resolution: int | None = None
    batch_size: int = 8

    def record(self, pipeline: DiffusionPipeline) -> dict[str, Any]:
        return {
            **asdict(self),
            "scheduler": type(pipeline.scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")},
            "pipeline": type(pipeline).__name__,
            "dtype": str(pipeline.dtype).removeprefix("torch."),  # images differ between precisions and devices
            "device": pipeline.device.type,
        }


@torch.inference_mode()
def generate(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    output_dir: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    source: dict[str, Any] | None = None,
    progress: bool = False,
    desc: str = "Generating images",
) -> list[Generation]:
    """Generate ``num_images_per_prompt`` images for every prompt into ``output_dir``.

    Images already on disk for a prompt and seed are kept, not generated again, so an interrupted
    evaluation resumes where it stopped. The settings, the scheduler and ``source`` (which model made
    the images) are written to ``generation.json``; resuming with different ones is refused.
    ``progress`` shows one bar over the images still to generate (the pipeline's per-call bars stay off).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {**settings.record(pipeline), "source": source or {}}
    record = json.loads(json.dumps(record, default=str))
    settings_file = output_dir / "generation.json"
    if settings_file.exists():
        previous = json.loads(settings_file.read_text())
        changed = sorted(
            k for k in set(previous) | set(record) if k != "batch_size" and previous.get(k) != record.get(k)
        )
        if changed:
            raise InputError(
                f"{output_dir} holds images generated with other settings ({', '.join(changed)} differ); "
                "use another output_dir."
            )
    settings_file.write_text(json.dumps(record, indent=2))

    generations = []
    for prompt_index, prompt in enumerate(prompts):
        for image_index in range(settings.num_images_per_prompt):
            seed = prompt_seed(prompt, settings.seed, image_index)
            path = output_dir / _file_name(prompt, image_index, seed)
            generations.append(Generation(prompt, prompt_index, image_index, seed, str(path)))
    todo = [g for g in generations if not Path(g.path).exists()]
    size = {"height": settings.resolution, "width": settings.resolution} if settings.resolution else {}
    was_disabled = getattr(pipeline, "_progress_bar_config", {}).get("disable", False)
    pipeline.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(todo), desc=desc, unit="image", disable=not progress)
    try:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            images = pipeline(
                prompt=[g.prompt for g in batch],
                generator=[torch.Generator("cpu").manual_seed(g.seed) for g in batch],
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                output_type="pil",
                **size,
            ).images
            for generation, image in zip(batch, images):
                image.save(generation.path)
            bar.update(len(batch))
    finally:
        bar.close()
        pipeline.set_progress_bar_config(disable=was_disabled)
    return generations
