"""DiffusionDPOTrainer: Diffusion-DPO for SD1.5 and SDXL (LoRA or full), with TRL's conventions.

It subclasses ``transformers.Trainer`` directly rather than TRL's private base trainer (whose telemetry
and model-card code assume a transformers text model). The trained module is the UNet; the VAE and text
encoders are frozen helpers; the reference is the same UNet with its LoRA adapters disabled, or a
frozen copy for full fine-tuning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from fifa_hf.data import to_preference_pairs
from fifa_hf.trainer.collator import CachedPairCollator, DiffusionDPOCollator, crop_pair, decode
from fifa_hf.trainer.config import DiffusionDPOConfig
from fifa_hf.trainer.loss import diffusion_dpo_loss, per_sample_mse

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MODEL_FILE_PATTERNS = [
    "README.md", "*.safetensors", "model_index.json", "unet/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
    "tokenizer/*", "tokenizer_2/*", "scheduler/*",
]  # fmt: skip


def load_pipeline(model: str | os.PathLike | DiffusionPipeline) -> DiffusionPipeline:
    """A Hub id, a local pipeline directory or a pipeline object; SD pipelines load without a safety checker."""
    if isinstance(model, DiffusionPipeline):
        return model
    config = DiffusionPipeline.load_config(str(model))
    if "text_encoder_2" in config:
        return StableDiffusionXLPipeline.from_pretrained(str(model))
    return StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)


def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class _DiffusersTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, which writes ``model.config.to_json_string()`` at the start: a
    diffusers config (a FrozenDict) has no such method, so the config is written as JSON here instead."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.tb_writer is not None and model is not None:
            self.tb_writer.add_text("model_config", json.dumps(dict(model.config), indent=2, default=str))


class _CollatorEpoch(TrainerCallback):
    """Tells the collator which epoch it is, so each epoch draws new augmentations."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


@dataclass
class LatentCache:
    """VAE latent distributions (per flip) and prompt embeddings computed once, sampled every step."""

    latent_parameters: dict[bool, torch.Tensor]  # flip -> (pairs, 2, 2 * latent channels, h, w)
    prompt_index: torch.Tensor  # pair -> row of prompt_embeds
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    empty_prompt_embeds: torch.Tensor
    empty_pooled_prompt_embeds: torch.Tensor | None
    original_sizes: torch.Tensor
    crop_top_lefts: dict[bool, torch.Tensor]


class DiffusionDPOTrainer(Trainer):
    """Trainer for Diffusion-DPO (Wallace et al., 2023) on canonical or Pick-a-Pic preference data.

    Args:
        model: a Hub id, a local pipeline directory, or a `DiffusionPipeline` (SD1.5 or SDXL; detected).
        args: a `DiffusionDPOConfig`; default: one writing to `<model name>-DiffusionDPO`.
        train_dataset / eval_dataset: Pick-a-Pic rows (`caption`, `jpg_0`, `jpg_1`, `label_0`, ...), TRL
            rows (`prompt`, `chosen`, `rejected`) or a FiFA subset written by `fifa-hf filter`.
        peft_config: a `peft.LoraConfig` on the UNet's attention projections for LoRA training; `None`
            trains the whole UNet against a frozen copy.
    """

    _tag_names = ["trl", "diffusion-dpo", "fifa", "diffusers"]
    _name = "Diffusion-DPO"
    _paper = {
        "title": "Diffusion Model Alignment Using Direct Preference Optimization",
        "id": "2311.12908",
        "citation": """@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and Purushwalkam, Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}""",
    }

    def __init__(
        self,
        model: str | os.PathLike | DiffusionPipeline,
        args: DiffusionDPOConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            name = Path(str(model)).name if not isinstance(model, DiffusionPipeline) else "pipeline"
            args = DiffusionDPOConfig(output_dir=f"{name}-DiffusionDPO")
        self.base_model = str(model) if not isinstance(model, DiffusionPipeline) else model.name_or_path
        self.pipeline = load_pipeline(model)
        self.is_sdxl = isinstance(self.pipeline, StableDiffusionXLPipeline)
        self.is_lora = peft_config is not None
        unet = self.pipeline.unet
        for module in self._frozen_modules():
            module.requires_grad_(False).eval()
        self.ref_unet = None
        if self.is_lora:
            unet.requires_grad_(False)
            unet.add_adapter(peft_config)
        else:
            unet.requires_grad_(True)
            if not args.sft:
                self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # diffusers' API; transformers.Trainer would call another
            args.gradient_checkpointing = False
        self.noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        self.resolution = args.resolution or unet.config.sample_size * self.pipeline.vae_scale_factor
        self.dataset_reports = {}
        self.dataset_names = [
            name for name in (getattr(getattr(train_dataset, "info", None), "dataset_name", None),) if name
        ]
        with PartialState().main_process_first():
            train_dataset = self._prepare_dataset(train_dataset, args, "train")
            eval_dataset = self._prepare_dataset(eval_dataset, args, "eval")
        if args.cache_latents:
            collator = CachedPairCollator(not args.no_hflip, args.proportion_empty_prompts, args.seed)
        else:
            collator = DiffusionDPOCollator(
                self.resolution, args.random_crop, not args.no_hflip, args.proportion_empty_prompts, args.seed
            )
        super().__init__(
            model=unet,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[*(callbacks or []), _CollatorEpoch(collator)],
            optimizers=optimizers,
        )
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):  # in place: callbacks run in order
            if type(callback) is TensorBoardCallback:
                callbacks[index] = _DiffusersTensorBoardCallback()
        for module in self._frozen_modules():
            module.to(self.accelerator.device)
        if self.ref_unet is not None:
            self.ref_unet.to(self.accelerator.device)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._caches: dict[str, LatentCache] = {}
        if args.cache_latents:
            for mode, dataset in (("train", train_dataset), ("eval", eval_dataset)):
                if dataset is not None:
                    self._caches[mode] = self._build_cache(dataset)

    # ---- data ----------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2")
        return [getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None) is not None]

    def _prepare_dataset(self, dataset, args: DiffusionDPOConfig, name: str):
        if dataset is None:
            return None
        if isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"{name}_dataset is streaming; Diffusion-DPO needs a map-style dataset (a FiFA subset is small)."
            )
        # Every image is decoded whole now: a truncated file is dropped and counted, not a crash mid-training.
        pairs, report = to_preference_pairs(
            dataset, drop_ties=args.drop_ties, num_proc=args.dataset_num_proc, verify_images=True
        )
        self.dataset_reports[name] = report
        logger.info("%s dataset: %s", name, report)
        if len(pairs) == 0:
            problem = "it has no rows" if report.rows_in == 0 else f"every row was dropped ({report})"
            raise ValueError(f"{name}_dataset holds no usable preference pair: {problem}.")
        pairs = pairs.select_columns(["prompt", "chosen", "rejected"])
        return pairs.add_column("pair_index", list(range(len(pairs))))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states (and SDXL's pooled embedding); SDXL's empty prompts become zeros."""
        device = self.accelerator.device
        if not self.is_sdxl:
            ids = _tokenize(self.pipeline.tokenizer, prompts)
            return self.pipeline.text_encoder(ids.to(device))[0], None
        hidden, pooled = [], None
        pairs = (
            (self.pipeline.tokenizer, self.pipeline.text_encoder),
            (self.pipeline.tokenizer_2, self.pipeline.text_encoder_2),
        )
        for tokenizer, encoder in pairs:
            ids = _tokenize(tokenizer, prompts)
            output = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        embeds = torch.cat(hidden, dim=-1)
        empty = torch.tensor([p == "" for p in prompts], device=device)
        return embeds.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)

    def _time_ids(self, original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample."""
        target = torch.tensor([self.resolution, self.resolution]).expand(len(original_sizes), 2)
        return torch.cat([original_sizes, crop_top_lefts, target], dim=1).to(self.accelerator.device, torch.float32)

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        return vae.encode(pixels.to(self.accelerator.device, vae.dtype)).latent_dist.parameters

    @torch.no_grad()
    def _build_cache(self, pairs: datasets.Dataset) -> LatentCache:
        flips = (False, True) if not self.args.no_hflip else (False,)
        latents: dict[bool, list[torch.Tensor]] = {flip: [] for flip in flips}
        crops: dict[bool, list] = {flip: [] for flip in flips}
        sizes = []
        batch_size = max(1, self.args.per_device_train_batch_size)
        for start in range(0, len(pairs), batch_size):
            rows = pairs[start : start + batch_size]
            for flip in flips:
                encoded = [
                    crop_pair(decode(winner), decode(loser), self.resolution, False, flip)
                    for winner, loser in zip(rows["chosen"], rows["rejected"])
                ]
                pixels = torch.stack([torch.stack([winner, loser]) for winner, loser, _, _ in encoded])
                parameters = self._encode_images(pixels.flatten(0, 1)).unflatten(0, (len(encoded), 2))
                latents[flip].append(parameters.cpu())
                crops[flip] += [crop for _, _, _, crop in encoded]
                if flip is False:
                    sizes += [size for _, _, size, _ in encoded]
        unique = list(dict.fromkeys(pairs["prompt"]))
        position = {prompt: i for i, prompt in enumerate(unique)}
        embeds, pooled = zip(*(self.encode_prompts(unique[i : i + 64]) for i in range(0, len(unique), 64)))
        empty, empty_pooled = self.encode_prompts([""])
        return LatentCache(
            latent_parameters={flip: torch.cat(latents[flip]) for flip in flips},
            prompt_index=torch.tensor([position[p] for p in pairs["prompt"]]),
            prompt_embeds=torch.cat(embeds).cpu(),
            pooled_prompt_embeds=torch.cat(pooled).cpu() if self.is_sdxl else None,
            empty_prompt_embeds=empty.cpu(),
            empty_pooled_prompt_embeds=empty_pooled.cpu() if self.is_sdxl else None,
            original_sizes=torch.tensor(sizes),
            crop_top_lefts={flip: torch.tensor(crops[flip]) for flip in flips},
        )

    def _batch_from_cache(self, inputs: dict[str, torch.Tensor], cache: LatentCache):
        device = self.accelerator.device
        index, flips, dropped = inputs["pair_index"].cpu(), inputs["flip"].cpu(), inputs["drop_prompt"].cpu()
        parameters = torch.stack([cache.latent_parameters[bool(f)][i] for i, f in zip(index, flips)]).to(device)
        crops = torch.stack([cache.crop_top_lefts[bool(f)][i] for i, f in zip(index, flips)])
        hidden = cache.prompt_embeds[cache.prompt_index[index]].clone()
        hidden[dropped] = cache.empty_prompt_embeds
        pooled = None
        if self.is_sdxl:
            pooled = cache.pooled_prompt_embeds[cache.prompt_index[index]].clone()
            pooled[dropped] = cache.empty_pooled_prompt_embeds
            pooled = pooled.to(device)
        time_ids = self._time_ids(cache.original_sizes[index], crops) if self.is_sdxl else None
        return parameters, hidden.to(device), pooled, time_ids

    def _batch_from_pixels(self, inputs: dict[str, Any]):
        pixels = torch.cat([inputs["chosen_pixel_values"], inputs["rejected_pixel_values"]])
        parameters = self._encode_images(pixels)
        parameters = torch.stack(parameters.chunk(2), dim=1)
        hidden, pooled = self.encode_prompts(inputs["prompts"])
        time_ids = self._time_ids(inputs["original_sizes"], inputs["crop_top_lefts"]) if self.is_sdxl else None
        return parameters, hidden, pooled, time_ids

    # ---- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if self.args.cache_latents:
            batch = self._batch_from_cache(inputs, self._caches[mode])
        else:
            batch = self._batch_from_pixels(inputs)
        loss, metrics = self._compute_loss(model, *batch)
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).float().mean().item())
        return (loss, None) if return_outputs else loss

    def _compute_loss(self, model, latent_parameters, hidden, pooled, time_ids):
        """Sample the VAE latents of each pair (fresh every step, cached or not), then the loss."""
        scaling = self.pipeline.vae.config.scaling_factor
        latents = DiagonalGaussianDistribution(latent_parameters.flatten(0, 1)).sample().unflatten(0, (-1, 2))
        latents = latents * scaling
        return self._loss_from_latents(model, latents[:, 0], latents[:, 1], hidden, pooled, time_ids)

    def _loss_from_latents(self, model, latents_w, latents_l, hidden, pooled, time_ids):
        """One noise and timestep per pair, one policy forward on chosen+rejected, one reference forward."""
        noise = torch.randn_like(latents_w)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents_w),), device=latents_w.device
        )
        copies = 1 if self.args.sft else 2
        latents = latents_w if self.args.sft else torch.cat([latents_w, latents_l])
        noise, timesteps = noise.repeat(copies, 1, 1, 1), timesteps.repeat(copies)
        hidden = hidden.repeat(copies, 1, 1)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.repeat(copies, 1),
                "time_ids": time_ids.repeat(copies, 1),
            }
        mse = per_sample_mse(model(noisy, timesteps, hidden, **kwargs).sample, target)
        if self.args.sft:
            return mse.mean(), {"mse/policy_chosen": mse}
        with torch.no_grad():
            ref_mse = per_sample_mse(self._reference_forward(model, noisy, timesteps, hidden, kwargs), target)
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref_mse.chunk(2)
        losses, chosen_rewards, rejected_rewards = diffusion_dpo_loss(
            mse_w, mse_l, ref_w, ref_l, self.args.beta, self.args.loss_type
        )
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float(),
            "mse/policy_chosen": mse_w,
            "mse/policy_rejected": mse_l,
            "mse/ref_chosen": ref_w,
            "mse/ref_rejected": ref_l,
        }
        return losses.mean(), metrics

    def _reference_forward(self, model, noisy, timesteps, hidden, kwargs) -> torch.Tensor:
        if self.ref_unet is not None:
            return self.ref_unet(noisy, timesteps, hidden, **kwargs).sample
        unet = self.accelerator.unwrap_model(model)
        unet.disable_adapters()
        try:
            return unet(noisy, timesteps, hidden, **kwargs).sample
        finally:
            unet.enable_adapters()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # ---- saving --------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``load_lora_weights``; full: ``unet/``; plus the card.

        transformers calls ``_save`` on every process; only the one that should save writes.
        """
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.model)
        pipeline_class = type(self.pipeline)
        if self.is_lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            pipeline_class.save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
        else:
            unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
            if self.args.save_full_pipeline:
                components = {**self.pipeline.components, "unet": unet}
                pipeline_class(**components).save_pretrained(output_dir, safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self.create_model_card(output_dir=output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        unet = self.accelerator.unwrap_model(model or self.model)
        if self.is_lora:
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft.utils import set_peft_model_state_dict

            state = load_file(os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME))
            state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
            set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
        else:
            state = load_file(os.path.join(resume_from_checkpoint, "unet", "diffusion_pytorch_model.safetensors"))
            unet.load_state_dict(state)

    def create_model_card(
        self,
        output_dir: str | None = None,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags=None,
        **kwargs,
    ) -> None:
        """Write the Hub model card (``README.md``): metadata, hyperparameters, quick start, citations."""
        from fifa_hf.cards import diffusion_model_card

        if dataset_name:
            self.dataset_names = [dataset_name]
        output_dir = output_dir or self.args.output_dir
        card = diffusion_model_card(
            base_model=self.base_model,
            model_id=self.hub_model_id or output_dir,
            is_sdxl=self.is_sdxl,
            is_lora=self.is_lora,
            datasets=self.dataset_names,
            extra_tags=[*(tags or [])],
            hyperparameters=self._card_hyperparameters(),
            paper_citation=self._paper["citation"],
        )
        card.save(os.path.join(output_dir, "README.md"))

    def _card_hyperparameters(self) -> dict[str, Any]:
        a = self.args
        effective = a.per_device_train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        return {
            "method": "SFT" if a.sft else f"Diffusion-DPO ({a.loss_type})",
            "beta": a.beta,
            "learning_rate": a.learning_rate,
            "lr_scheduler": str(
                a.lr_scheduler_type.value if hasattr(a.lr_scheduler_type, "value") else a.lr_scheduler_type
            ),
            "optimizer": str(a.optim.value if hasattr(a.optim, "value") else a.optim),
            "effective_batch_size": effective,
            "max_steps": a.max_steps,
            "resolution": self.resolution,
            "proportion_empty_prompts": a.proportion_empty_prompts,
            "training": "LoRA" if self.is_lora else "full UNet",
        }

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str | None:
        """Save the weights and the card, then commit them (never checkpoints or logs) to ``hub_model_id``."""
        from fifa_hf.hub import upload_files

        if kwargs.get("dataset_name"):
            self.dataset_names = [kwargs["dataset_name"]]
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model()
        if not self.is_world_process_zero():
            return None
        return upload_files(
            self.args.output_dir,
            self.hub_model_id,
            "model",
            MODEL_FILE_PATTERNS,
            commit_message,
            token=token,
            revision=revision,
        )
