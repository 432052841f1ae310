"""Diffusion-DPO step cost on the tiny SD at 64 px, CPU: cache_latents off vs on.

    python benchmarks/bench_train.py [--steps 20]

Each setting runs in its own process (so peak memory is its own); prints seconds per optimizer step
(median), peak RSS, the ratio, and UNet forward passes per step (policy + reference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

RUN = """
import json, resource, statistics, sys, time, torch
from peft import LoraConfig
from transformers import TrainerCallback
from fifa_hf.world.synthetic import make_synthetic_pickapic
from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

model, out, cache, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
pairs = make_synthetic_pickapic(64, seed=0, image_size=256, tie_fraction=0)
times = []

class StepTimer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.start)

args = DiffusionDPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps, resolution=64,
                          cache_latents=cache, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                          logging_steps=1000)
lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
trainer = DiffusionDPOTrainer(model, args, train_dataset=pairs, peft_config=lora, callbacks=[StepTimer()])
forwards = []
trainer.model.register_forward_hook(lambda *a: forwards.append(1))
trainer.train()
print("BENCH " + json.dumps({"step_s": statistics.median(times[2:]), "forwards_per_step": len(forwards) / steps,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    steps = parser.parse_args().steps
    from fifa_hf.testing import save_tiny_sd

    with tempfile.TemporaryDirectory() as directory:
        model = str(save_tiny_sd(f"{directory}/sd"))
        results = {}
        for cache in (0, 1):
            process = subprocess.run(
                [sys.executable, "-c", RUN, model, f"{directory}/out{cache}", str(cache), str(steps)],
                capture_output=True, text=True,
            )  # fmt: skip
            if process.returncode:
                sys.exit(process.stderr[-3000:])
            line = [line for line in process.stdout.splitlines() if line.startswith("BENCH ")][-1]
            results[cache] = json.loads(line[len("BENCH ") :])
            r = results[cache]
            print(f"cache_latents={bool(cache)!s:5}: {r['step_s'] * 1000:7.1f} ms/step (median), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, UNet forward passes per step {r['forwards_per_step']:.0f} "
                  "(policy on chosen+rejected, reference with adapters disabled)")  # fmt: skip
        print(f"speed-up from cache_latents: {results[0]['step_s'] / results[1]['step_s']:.2f}x; "
              f"memory ratio (on/off) {results[1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
