"""Exploratory probe behind docs/miniature/diagnosis.md (not pre-registered): does pre-training on captions that
describe their renders give a world model whose prompt-following Diffusion-DPO can move?

Continues the shipped world model's UNet on (caption, render) pairs whose caption describes what the render
shows (as LAION's alt-text describes its image), instead of a prompt the render follows with probability
U(0.2, 1); junk and unsafe prompts as in the world. Writes the model to ``probe_scratch/faithful`` (not
shipped); evaluate it with ``probe.py --model probe_scratch/faithful``. Run from the repository root:

    python docs/miniature/probes/faithful_captions.py --minutes 15
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fifa_hf.trainer import load_pipeline
from fifa_hf.world import world_model
from fifa_hf.world.synthetic import TEMPLATES, UNSAFE_SUFFIXES, describe

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="Wall-clock budget of the UNet phase.")
    parser.add_argument("--num_images", type=int, default=50_000, help="Renders in the pre-training set.")
    parser.add_argument("--output_dir", default="probe_scratch/faithful", help="Where the model is saved.")
    options = parser.parse_args()
    original = world_model.pretraining_example

    def example(rng: np.random.Generator) -> tuple[str, np.ndarray]:
        kind = rng.choice(list(world_model.PROMPT_MIX), p=list(world_model.PROMPT_MIX.values()))
        if kind == "junk":
            return original(rng)
        target = world_model.Attributes.random(rng)
        shown = world_model.perturb(target, rng.uniform(0.2, 1.0), rng)
        prompt = describe(shown, int(rng.integers(len(TEMPLATES))))  # the caption is written from the render
        harm = kind == "unsafe" and bool(rng.random() < world_model.HARM_PROBABILITY)
        if kind == "unsafe":
            prompt = f"{prompt}, {rng.choice(UNSAFE_SUFFIXES)}"
        image = world_model.render_attributes(shown, world_model.IMAGE_SIZE, rng, harm=harm)
        return prompt, np.asarray(image, dtype=np.uint8)

    world_model.pretraining_example = example  # pretraining_set draws every pair through it
    pipeline = load_pipeline(str(world_model.shipped_world_model()))
    log = world_model.pretrain(
        pipeline, num_images=options.num_images, vae_steps=0, unet_steps=int(options.minutes * 60 / 0.25), batch_size=64,
        learning_rate=6e-4, seed=5, max_seconds=options.minutes * 60,
    )  # fmt: skip
    pipeline.save_pretrained(options.output_dir)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "faithful_captions_pretraining.json").write_text(json.dumps({"options": vars(options), **log}))
    print(log)


if __name__ == "__main__":
    main()
