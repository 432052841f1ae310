"""Runs examples/train.py in each process, then records a weight checksum per rank and who saved."""

import os
import runpy
import sys

import torch
from diffusers import StableDiffusionPipeline

script, *argv = sys.argv[1:]
rank = int(os.environ["RANK"])
original_save = StableDiffusionPipeline.save_lora_weights.__func__


def recording_save(cls, save_directory, **kwargs):
    original_save(cls, save_directory, **kwargs)
    open(os.path.join(save_directory, f"saved-by-rank{rank}"), "a").write("x")


StableDiffusionPipeline.save_lora_weights = classmethod(recording_save)
sys.argv = [script, *argv]
namespace = runpy.run_path(script)
from trl import ModelConfig, ScriptArguments, TrlParser  # noqa: E402

from fifa_hf.trainer import DiffusionDPOConfig  # noqa: E402

trainer = namespace["main"](*TrlParser((ScriptArguments, DiffusionDPOConfig, ModelConfig)).parse_args_and_config(argv))
total = sum(p.detach().double().sum().item() for p in trainer.model.parameters() if p.requires_grad)
assert trainer.accelerator.num_processes == 2
with open(os.path.join(trainer.args.output_dir, f"checksum-rank{rank}"), "w") as f:
    f.write(f"{total:.10e}")
torch.distributed.barrier()
