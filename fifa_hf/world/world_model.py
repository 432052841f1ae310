"""A tiny text-to-image model of the synthetic world, and the script that pre-trains it.

The model is a real ``StableDiffusionPipeline``: a CLIP text encoder (with a CLIP BPE tokenizer whose
merges spell the world's words), an ``AutoencoderKL`` (32 px images, 16x16x4 latents) and a
``UNet2DConditionModel`` (~1M parameters). Pre-training fits the VAE, then the UNet and text encoder,
on renders whose attributes match their prompt only partly (each attribute is kept with probability
between 0.2 and 1, as in the synthetic Pick-a-Pic), so the model follows prompts only partly and
preference alignment has room to help. The weights (a few MB) ship in ``fifa_hf/resources/world_model``:

    python -m fifa_hf.world.world_model --output_dir fifa_hf/resources/world_model
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fifa_hf.testing import _byte_alphabet
from fifa_hf.world.synthetic import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    SHAPES,
    STYLES,
    TEMPLATES,
    Attributes,
    describe,
    perturb,
)
from fifa_hf.world.synthetic import render as render_attributes

IMAGE_SIZE = 32
MAX_TOKENS = 24


def world_vocabulary() -> list[str]:
    words = {"background", *COUNTS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *BACKGROUNDS, *STYLES}
    for template in TEMPLATES:
        words |= {w.strip(",") for w in template.split() if not w.startswith("{")}
    return sorted(w for w in words if w)


def world_tokenizer():
    """A CLIPTokenizer over bytes plus one token per word of the grammar (other text falls back to bytes)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges = []
    # Longer words' merges rank first, so no shorter word's merge splits them (each word is one token).
    for word in sorted(world_vocabulary(), key=len, reverse=True):
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            tokens.append(merged)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=MAX_TOKENS)


def build_world_pipeline(seed: int = 0):
    """The untrained pipeline (random weights); ``pretrain`` fits it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _batch(rng: np.random.Generator, size: int) -> tuple[list[str], torch.Tensor]:
    """Prompts and renders that match them partly, as pixel tensors in [-1, 1]."""
    prompts, images = [], []
    for _ in range(size):
        target = Attributes.random(rng)
        prompts.append(describe(target, int(rng.integers(len(TEMPLATES)))))
        shown = perturb(target, rng.uniform(0.2, 1.0), rng)
        images.append(np.asarray(render_attributes(shown, IMAGE_SIZE, rng), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return prompts, pixels


def pretrain(
    pipeline, vae_steps: int = 800, unet_steps: int = 3000, batch_size: int = 32, seed: int = 0, log_every: int = 250
):
    """Fit the VAE on renders, then the UNet and text encoder on partly-matching (prompt, render) pairs."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae, unet, text_encoder, tokenizer = pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(vae_steps):
        _, pixels = _batch(rng, batch_size)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % log_every == 0 or step == vae_steps - 1:
            print(f"vae step {step}: reconstruction mse {loss.item():.5f} ({time.perf_counter() - start:.0f} s)")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(_batch(rng, 64)[1]).latent_dist.mean for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, unet_steps // 20), unet_steps)
    unet.train()
    text_encoder.train()
    for step in range(unet_steps):
        prompts, pixels = _batch(rng, batch_size)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]  # for classifier-free guidance
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        hidden = text_encoder(ids.input_ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % log_every == 0 or step == unet_steps - 1:
            print(f"unet step {step}: denoising mse {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    unet.eval()
    text_encoder.eval().requires_grad_(False)
    return pipeline


def shipped_world_model() -> Path:
    """The directory of the pre-trained world pipeline that ships with the package."""
    path = Path(str(resources.files("fifa_hf").joinpath("resources/world_model")))
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"No pre-trained world model at {path}; run python -m fifa_hf.world.world_model")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="fifa_hf/resources/world_model")
    parser.add_argument("--vae_steps", type=int, default=800)
    parser.add_argument("--unet_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipeline = pretrain(build_world_pipeline(args.seed), args.vae_steps, args.unet_steps, args.batch_size, args.seed)
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
