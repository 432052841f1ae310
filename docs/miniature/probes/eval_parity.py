"""Exploratory check behind section 8 of docs/miniature/diagnosis.md: does the trainer's pipeline, before any
training, evaluate as the base model's does? Every control block's validation prompts, seeds and noise; a
constant offset would be an artefact of the evaluation, not of training. Run from the repository root (about
3 minutes on 2 CPU cores); writes docs/miniature/probes/results/eval_parity.json.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer, load_pipeline
from fifa_hf.world.miniature import MiniatureArguments, _evaluate, evaluation_set, training_rows, world_rows
from fifa_hf.world.world_model import IMAGE_SIZE

torch.set_num_threads(2)
args = MiniatureArguments()
model = args.resolved_model()
base = load_pipeline(model)
out = {}
with tempfile.TemporaryDirectory() as scratch:
    rows = world_rows(100, args.num_pairs, args.label_temperature)
    world = json.loads(Path("docs/miniature/worlds/w100.json").read_text())
    config = DiffusionDPOConfig(
        output_dir=scratch,
        max_steps=1,
        per_device_train_batch_size=16,
        rpo_alpha=500.0,
        learning_rate=1e-4,
        beta=500.0,
        resolution=IMAGE_SIZE,
        cache_latents=True,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = DiffusionDPOTrainer(model, config, train_dataset=training_rows(rows, world, "shuffled_oracle"))
    pipe = trainer.pipeline
    pipe.unet.eval()
    for w in (100, 101, 102, 103, 104):
        rows = world_rows(w, args.num_pairs, args.label_temperature)
        for s in (0, 1, 2):
            evaluation = evaluation_set(rows, "validation", w, s, args, (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2))
            a = _evaluate(base, evaluation, args, 64, 0)[0]["true_reward"]
            b = _evaluate(pipe, evaluation, args, 64, 0)[0]["true_reward"]
            out[f"{w}-{s}"] = (a, b)
            print(w, s, round(a, 4), round(b, 4), round(b - a, 4), flush=True)
d = np.array([b - a for a, b in out.values()])
print("mean trainer - base", d.mean().round(4), "sd", d.std(ddof=1).round(4), "n", len(d))
Path("docs/miniature/probes/results/eval_parity.json").write_text(json.dumps(out, indent=1))
