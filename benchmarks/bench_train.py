"""Diffusion-DPO step time on CPU: our trainer (cache_latents off and on) against diffusers' script, in one run.

    python benchmarks/bench_train.py [--peer train_diffusion_dpo.py] [--res 64] [--unet-channels 32,64]
                                     [--rounds 3] [--steps 30] [--threads 2]
    python benchmarks/bench_train.py --sd15 --peer train_diffusion_dpo.py --rounds 1 --steps 15   # on a GPU

An SD1.5-shaped model with random weights (VAE with 4 levels, latents at res/8; a 2-layer text encoder; a UNet
with the given block widths) and 64 Pick-a-Pic-style pairs are built offline. Each round runs, in rotating
order and in fresh processes with the same thread count: A diffusers' `train_diffusion_dpo.py` (unmodified,
when --peer is given; it needs torchvision, tensorboard and wandb), B our trainer, C our trainer with
`cache_latents`. All: batch 4 pairs, LoRA r4 on to_q/to_k/to_v/to_out.0, lr 1e-4 constant, weight decay 0.01,
clip 1.0, seed 0, every step logged. A global optimizer-step hook stamps every step (neither trainer is changed);
step k lasts stamp(k) - stamp(k-1), medians over steps 6..N. Prints per round the step times and the ratios
B/A and C/A (wall and process CPU time), then their medians, then where our uncached step spends its time.

With --sd15 the model has SD1.5's sizes (UNet 860M, VAE 84M, a CLIP-L-sized text encoder; random weights) at
512 px, and on a GPU every run uses bf16 (diffusers: `--mixed_precision bf16`, frozen weights in bf16; ours:
`--bf16 true --dtype bfloat16`, the same); the peak GPU memory of each run is printed beside its step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = """
import os, sys, time, runpy
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = open(os.environ["BENCH_STEPS"], "a", buffering=1)
def stamp(*args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    stamps.write(f"{time.perf_counter():.6f} {time.process_time():.6f} {peak}\\n")
register_optimizer_step_post_hook(stamp)
script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""
FIRST_TIMED = 6


def build(directory: Path, res: int, channels: tuple[int, ...], sd15: bool = False) -> tuple[Path, Path]:
    """An SD1.5-shaped pipeline with random weights (SD1.5's sizes with ``sd15``) and 64 preference pairs at
    ``res`` px, as parquet."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fifa_hf.testing import tiny_clip_tokenizer
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    width = 768 if sd15 else 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3072 if sd15 else 37,
            num_hidden_layers=12 if sd15 else 2, num_attention_heads=12 if sd15 else 4, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if sd15 else (32, 32, 64, 64), layers_per_block=2 if sd15 else 1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        norm_num_groups=32, sample_size=res,
    )  # fmt: skip
    if sd15:  # stable-diffusion-v1-5's unet/config.json
        unet = UNet2DConditionModel(
            sample_size=res // 8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            sample_size=res // 8, block_out_channels=channels, layers_per_block=2, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, steps_offset=1,
    )  # fmt: skip
    model = directory / "sd"
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(model)  # fmt: skip
    data = directory / "data"
    data.mkdir()
    pairs = make_synthetic_pickapic(64, seed=0, image_size=res, tie_fraction=0, unlabeled_fraction=0)
    pairs.select_columns(["caption", "jpg_0", "jpg_1", "label_0", "label_1"]).to_parquet(str(data / "train.parquet"))
    return model, data


def command(
    label: str, peer: str | None, model: Path, data: Path, out: Path, res: int, steps: int, gpu: bool = False
) -> list[str]:
    common = ["--learning_rate", "1e-4", "--output_dir", str(out), "--seed", "0", "--resolution", str(res)]
    if label == "A":
        return [
            peer, "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
            "--dataset_split_name", "train", "--train_batch_size", "4", "--max_train_steps", str(steps),
            "--rank", "4", "--report_to", "tensorboard", "--checkpointing_steps", "100000", *common,
            *(["--mixed_precision", "bf16"] if gpu else []),
        ]  # fmt: skip
    device = ["--bf16", "true", "--dtype", "bfloat16"] if gpu else ["--use_cpu", "true"]
    return [
        str(Path(__file__).parent.parent / "examples" / "train.py"), "--model_name_or_path", str(model),
        "--dataset_name", str(data), "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "4",
        "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "--per_device_train_batch_size", "4",
        "--max_steps", str(steps), "--lr_scheduler_type", "constant", "--weight_decay", "0.01",
        "--max_grad_norm", "1.0", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
        "--card_sample_steps", "0", "--cache_latents", "true" if label == "C" else "false", *device, *common,
    ]  # fmt: skip


def check_measured_checkout() -> Path:
    """The runs import fifa_hf from this interpreter's environment, which may be another checkout's editable
    install: refuse to time that code under this checkout's name."""
    here = Path(__file__).resolve().parent.parent
    found = subprocess.run(
        [sys.executable, "-c", "import fifa_hf; print(fifa_hf.__file__)"], capture_output=True, text=True
    )
    imported = Path(found.stdout.strip()).resolve().parent.parent if found.returncode == 0 else "nowhere"
    if imported != here:
        sys.exit(f"{sys.executable} imports fifa_hf from {imported}, not from {here}: pip install --no-deps -e {here}")
    return here


def run(label: str, argv: list[str], directory: Path, threads: int) -> dict[str, float]:
    stamps = directory / "steps.txt"
    env = {**os.environ, "BENCH_STEPS": str(stamps), "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.run([sys.executable, "-c", HOOK, *argv], capture_output=True, text=True, env=env)
    if process.returncode:
        sys.exit(f"run {label} failed:\n{process.stderr[-3000:]}")
    rows = [tuple(map(float, line.split())) for line in stamps.read_text().splitlines()]
    wall = [b[0] - a[0] for a, b in zip(rows, rows[1:])][FIRST_TIMED - 2 :]
    cpu = [b[1] - a[1] for a, b in zip(rows, rows[1:])][FIRST_TIMED - 2 :]
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "peak_gb": rows[-1][2] / 2**30}


def profile(model: Path, data: Path, res: int, steps: int, directory: Path) -> dict[str, float]:
    """Milliseconds per step of each part of our uncached step, timed in-process by wrapping the parts."""
    import torch
    from peft import LoraConfig

    from fifa_hf.data import load_preference_dataset
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

    totals: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    args = DiffusionDPOConfig(
        output_dir=str(directory / "profile"), per_device_train_batch_size=4, max_steps=steps, resolution=res,
        learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.01, report_to="none", save_strategy="no",
        use_cpu=True, logging_steps=steps, disable_tqdm=True, card_sample_steps=0,
    )  # fmt: skip
    lora = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    trainer = DiffusionDPOTrainer(str(model), args, train_dataset=load_preference_dataset(str(data)), peft_config=lora)
    unet = trainer.model
    forward = unet.forward
    unet.forward = lambda *a, **k: timed(
        "UNet policy forward" if torch.is_grad_enabled() else "UNet reference forward", forward
    )(*a, **k)  # noqa: E731, E501
    trainer._encode_images = timed("VAE encode", trainer._encode_images)
    trainer.encode_prompts = timed("text encoder", trainer.encode_prompts)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = timed("grad clipping", trainer._clip_grad_norm)
    trainer.get_batch_samples = timed("data (decode, crop, collate)", trainer.get_batch_samples)
    trainer.training_step = timed("whole training_step", trainer.training_step)
    trainer.create_optimizer()
    trainer.optimizer.step = timed("optimizer step", trainer.optimizer.step)
    start = time.perf_counter()
    trainer.train()
    totals["whole step (train loop)"] = time.perf_counter() - start
    return {name: 1000 * value / steps for name, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", help="diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--unet-channels", default="32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sd15", action="store_true", help="SD1.5's sizes at 512 px (bf16 on a GPU)")
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process profile of our step")
    args = parser.parse_args()
    print(f"measuring fifa_hf from {check_measured_checkout()}")
    import torch

    gpu = torch.cuda.is_available()
    if args.sd15:
        args.res, args.unet_channels = 512, "320,640,1280,1280"
    labels = (["A"] if args.peer else []) + ["B", "C"]
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        model, data = build(directory, args.res, tuple(map(int, args.unet_channels.split(","))), args.sd15)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
        for round_ in range(args.rounds):
            order = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
            for label in order:
                run_dir = directory / f"{round_}{label}"
                run_dir.mkdir()
                argv = command(label, args.peer, model, data, run_dir / "out", args.res, args.steps, gpu)
                results[label].append(run(label, argv, run_dir, args.threads))
                r = results[label][-1]
                print(f"  run {label}: {r['wall'] * 1000:.1f} ms/step, peak {r['peak_gb']:.2f} GiB", flush=True)
            row = {label: results[label][-1] for label in labels}
            line = ", ".join(
                f"{k} {v['wall'] * 1000:.1f} ms (cpu {v['cpu'] * 1000:.1f}"
                + (f", peak {v['peak_gb']:.2f} GiB)" if gpu else ")")
                for k, v in row.items()
            )
            if args.peer:
                line += "; " + ", ".join(
                    f"{k}/A wall {row[k]['wall'] / row['A']['wall']:.3f} cpu {row[k]['cpu'] / row['A']['cpu']:.3f}"
                    for k in ("B", "C")
                )
            print(f"round {round_ + 1}: {line}", flush=True)
        where = torch.cuda.get_device_name() + ", bf16" if gpu else f"CPU, {args.threads} threads"
        print(f"\nres {args.res}, UNet channels {args.unet_channels}, {where}, steps {args.steps}:")
        for label in labels:
            wall = statistics.median(r["wall"] for r in results[label])
            cpu = statistics.median(r["cpu"] for r in results[label])
            peak = max(r["peak_gb"] for r in results[label])
            memory = f", peak GPU memory {peak:.2f} GiB" if gpu else ""
            print(f"  {label}: median {wall * 1000:.1f} ms/step wall, {cpu * 1000:.1f} ms/step cpu{memory}")
        if args.peer:
            for label in ("B", "C"):
                ratios = [b["wall"] / a["wall"] for a, b in zip(results["A"], results[label])]
                cpu_ratios = [b["cpu"] / a["cpu"] for a, b in zip(results["A"], results[label])]
                print(f"  {label}/A: median wall {statistics.median(ratios):.3f} (rounds {[round(r, 3) for r in ratios]}),"
                      f" cpu {statistics.median(cpu_ratios):.3f}")  # fmt: skip
        if args.no_profile or gpu:
            return
        print("\nour uncached step, in-process (ms/step):")
        parts = profile(model, data, args.res, args.steps, directory)
        whole = parts.pop("whole step (train loop)")
        for name, value in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"  {name:32s} {value:7.1f}  {value / whole:6.1%}")
        print(f"  {'whole step (train loop)':32s} {whole:7.1f}")


if __name__ == "__main__":
    main()
