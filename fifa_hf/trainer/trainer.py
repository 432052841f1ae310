"""DiffusionDPOTrainer: Diffusion-DPO for SD1.5 and SDXL (LoRA or full), with TRL's conventions.

It subclasses ``transformers.Trainer`` directly rather than TRL's private base trainer (whose telemetry
and model-card code assume a transformers text model). The trained module is the UNet; the VAE and text
encoders are frozen helpers; the reference is the same UNet with its LoRA adapters disabled, or a
frozen copy for full fine-tuning, run under the same autocast as the policy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import HfApi
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy, enable_full_determinism
from transformers.trainer_utils import set_seed as set_seed_everywhere
from transformers.utils import PushInProgress
from trl.trainer.utils import disable_dropout_in_model

from fifa_hf.data import to_preference_pairs
from fifa_hf.pipelines import load_pipeline
from fifa_hf.progress import datasets_bars_disabled
from fifa_hf.storage import files_matching
from fifa_hf.trainer.collator import CachedPairCollator, DiffusionDPOCollator
from fifa_hf.trainer.config import UNSUPPORTED_SHARDING, DiffusionDPOConfig
from fifa_hf.trainer.frozen_layers import FrozenLayers, find_frozen_layers
from fifa_hf.trainer.latent_cache import LatentCache, build_latent_cache, shared_latent_cache
from fifa_hf.trainer.lean_forwards import lean_forwards, plain_attentions, plain_lora_linears
from fifa_hf.trainer.loss import diffusion_dpo_loss, per_sample_mse, preference_accuracy
from fifa_hf.trainer.shared_prefix import SharedFrozenPrefix

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction")
# What is published: the weights (LoRA file, or unet/ and the full pipeline if saved), the card and its samples.
MODEL_FILE_PATTERNS = [
    "README.md", "*.safetensors", "model_index.json", "unet/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
    "tokenizer/*", "tokenizer_2/*", "scheduler/*", "samples/*",
]  # fmt: skip


# LoRA settings that change what saved weights compute without changing their names or shapes.
LORA_SCALING_SETTINGS = ("lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def check_lora_settings(weights_file: str | os.PathLike, config) -> None:
    """Refuse a saved LoRA whose settings (kept in its file's metadata) scale its weights otherwise than ``config``:
    peft would load it without a word, and, say, twice the ``lora_alpha`` doubles the adapter's effect."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY) or "{}")
    saved = {key.removeprefix("unet."): value for key, value in metadata.items() if key.startswith("unet.")}
    current = config.to_dict()
    differing = [
        f"{name}: saved {saved[name]!r}, this run {current.get(name)!r}"
        for name in LORA_SCALING_SETTINGS
        if name in saved and saved[name] != current.get(name)
    ]
    if differing:
        raise ValueError(
            f"{weights_file}: the LoRA was trained with other settings ({'; '.join(differing)}). Resume with the "
            "LoRA settings of the run that saved it."
        )


def load_unet_weights(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a ``save_pretrained`` UNet directory's weights into ``unet``, sharded (index file) or not."""
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    state = {}
    for name in files or [SAFETENSORS_WEIGHTS_NAME]:
        state.update(load_file(directory / name))
    unet.load_state_dict(state)


def _enable_diffusers_checkpointing(unet: torch.nn.Module, kwargs: dict | None) -> None:
    """Activation checkpointing through diffusers' API, also answering transformers' hook.

    ``Trainer.train`` calls ``model.activation_checkpointing_enable`` (a transformers method diffusers models lack)
    whenever ``args.activation_checkpointing`` is set; the UNet gets one that accepts only what diffusers can do.
    """
    checkpoint_kwargs = {"use_reentrant": False, **(kwargs or {})}
    for option in ("every_n_layers", "offload"):
        if checkpoint_kwargs.pop(option, None) not in (None, 1 if option == "every_n_layers" else False):
            raise ValueError(f"activation_checkpointing_kwargs: {option!r} is not supported for a diffusers UNet.")

    def checkpoint(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, **checkpoint_kwargs)

    def activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        if every_n_layers != 1 or offload:
            raise ValueError("A diffusers UNet checkpoints every block, without offloading.")
        unet.enable_gradient_checkpointing(checkpoint)

    activation_checkpointing_enable()
    unet.activation_checkpointing_enable = activation_checkpointing_enable


def _train_unless_training(
    module: torch.nn.Module, frozen_layers: list[torch.nn.Module], mode: bool = True
) -> torch.nn.Module:
    """``module.train(mode)``, at once when it is already training. A LoRA's frozen layers stay in inference mode,
    where they compute the same (dropout is off) without diffusers' training-only copies: a resnet block makes its
    input contiguous in training mode, a memory-format copy of channels-last activations at every call."""
    if mode and module.training:
        return module
    torch.nn.Module.train(module, mode)
    for layer in frozen_layers:
        layer.eval()
    return module


def _zero_grads(parameters: list[torch.nn.Parameter], set_to_none: bool = True) -> None:
    for parameter in parameters:
        if parameter.grad is not None:
            if set_to_none:
                parameter.grad = None
            else:
                parameter.grad.zero_()


class _TrainingRandomness(TrainerCallback):
    """Per-process random streams, and new augmentations every epoch.

    When training starts (after the data sampler took its seed, so every process still shards one permutation),
    each process seeds torch with ``seed + process_index``: processes draw different latents, noise and
    timesteps, as in the Salesforce script. Each epoch the collators learn the epoch (through shared memory,
    so persistent dataloader workers see it too).
    """

    def __init__(self, collator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        seed = args.seed + args.process_index
        enable_full_determinism(seed) if args.full_determinism else set_seed_everywhere(seed)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


class _DiffusersTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, writing the model config of a diffusers model (a ``FrozenDict``)."""

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)
        if self.tb_writer is not None and model is not None and state.is_world_process_zero:
            self.tb_writer.add_text("model_config", json.dumps(dict(model.config), indent=2, default=str))


def _warn_if_accumulation_spans_epochs(args: DiffusionDPOConfig, num_pairs: int) -> None:
    """transformers steps the optimizer at the end of every epoch, so an accumulation longer than an epoch gives
    smaller updates than asked for, silently: say so before training starts."""
    batches = math.ceil(num_pairs / (args.per_device_train_batch_size * args.world_size))
    if args.gradient_accumulation_steps > batches:
        logger.warning(
            "gradient_accumulation_steps=%d is more than the %d batches of an epoch (%d pairs): transformers steps at "
            "the end of every epoch, so each update averages %d pairs, not %d. Lower gradient_accumulation_steps to "
            "at most %d, or repeat the dataset's rows for larger updates.",
            args.gradient_accumulation_steps, batches, num_pairs, num_pairs,
            args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps, batches,
        )  # fmt: skip


class DiffusionDPOTrainer(Trainer):
    """Trainer for Diffusion-DPO (Wallace et al., 2023) on canonical or Pick-a-Pic preference data.

    Args:
        model: a Hub id, a local pipeline directory, or a `DiffusionPipeline` (SD1.5 or SDXL; detected). A
            pipeline loaded in half precision trains a LoRA in fp32 over its half-precision weights; a full
            fine-tune needs fp32 weights (use `bf16=True` for mixed precision).
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
        # Seed before anything random happens here (the LoRA's initialisation); transformers seeds again later.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed_everywhere(args.seed)
        self.pipeline = load_pipeline(model)
        self.base_model = model.name_or_path if isinstance(model, DiffusionPipeline) else str(model)
        self.is_sdxl = isinstance(self.pipeline, StableDiffusionXLPipeline)
        self.is_lora = peft_config is not None
        self.noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"The scheduler of {self.base_model} predicts {prediction_type!r}; Diffusion-DPO trains "
                f"{' or '.join(PREDICTION_TYPES)} models (see prediction_type in scheduler/scheduler_config.json)."
            )
        unet = self.pipeline.unet
        for module in self._frozen_modules():
            module.requires_grad_(False).eval()
        self.pipeline.vae.to(memory_format=torch.channels_last)  # encodes 1.5-1.7x faster on CPU, same outputs
        if self.pipeline.vae.dtype == torch.float16 and self.pipeline.vae.config.get("force_upcast", False):
            self.pipeline.vae.to(torch.float32)  # SDXL's VAE overflows float16 (NaN latents); diffusers upcasts it too
        unet.to(memory_format=torch.channels_last)  # its convolutions: about 6% faster a step on CPU
        self._input_dtype, self._vae_dtype = unet.dtype, self.pipeline.vae.dtype  # (each a walk over the modules)
        if self.is_lora:
            if args.disable_dropout and getattr(peft_config, "lora_dropout", 0.0):
                # Trained without dropout, and saved so: the config travels with the weights, and diffusers leaves
                # reloaded LoRA layers in training mode, where a dropout > 0 would act at inference.
                peft_config = dataclasses.replace(peft_config, lora_dropout=0.0)
            unet.requires_grad_(False)
            unet.add_adapter(peft_config)
            cast_training_params(unet, dtype=torch.float32)  # the adapter trains in fp32 over half weights
        elif unet.dtype != torch.float32:
            raise ValueError(
                f"The UNet is in {unet.dtype}: a full fine-tune would train pure {unet.dtype} weights. Load the "
                "pipeline in float32 (the default; `--dtype float32`) and set bf16=True for mixed precision, or "
                "train a LoRA (peft_config / `--use_peft true`), which keeps its own weights in float32."
            )
        else:
            unet.requires_grad_(True)
        if args.disable_dropout:
            disable_dropout_in_model(unet)
        self.ref_unet = None
        if not self.is_lora and not args.sft:
            self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if args.activation_checkpointing:
            _enable_diffusers_checkpointing(unet, args.activation_checkpointing_kwargs)
        self._lora_layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
        self.resolution = args.resolution or unet.config.sample_size * self.pipeline.vae_scale_factor
        self.dataset_reports = {}
        self.dataset_names: list[str] = []
        self._card_tags: list[str] = []
        self._card_license: str | None = None
        self.fifa_subset = train_dataset is not None and "fifa_score" in (train_dataset.column_names or [])
        with PartialState().main_process_first():
            train_dataset = self._prepare_dataset(train_dataset, args, "train")
            eval_dataset = self._prepare_dataset(eval_dataset, args, "eval")
        if args.cache_latents:
            collator = CachedPairCollator(not args.no_hflip, args.proportion_empty_prompts, args.seed)
            self.eval_collator = CachedPairCollator(hflip=False)
        else:
            collator = DiffusionDPOCollator(
                self.resolution, args.random_crop, not args.no_hflip, args.proportion_empty_prompts, args.seed
            )
            self.eval_collator = DiffusionDPOCollator(self.resolution, hflip=False)
        super().__init__(
            model=unet,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[*(callbacks or []), _TrainingRandomness(collator)],
            optimizers=optimizers,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # set by `accelerate launch`'s config, not the args
            raise ValueError(UNSUPPORTED_SHARDING)
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):  # in place: callbacks run in order
            if type(callback) is TensorBoardCallback:
                callbacks[index] = _DiffusersTensorBoardCallback()
        if train_dataset is not None:
            _warn_if_accumulation_spans_epochs(args, len(train_dataset))
        for module in self._frozen_modules():
            module.to(self.accelerator.device)
        if self.ref_unet is not None:
            self.ref_unet.to(self.accelerator.device)
        self._trainable_parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        frozen = find_frozen_layers(unet) if self.is_lora else FrozenLayers()
        self._frozen_layers = frozen.layers
        self._shared_prefix = None  # the LoRA reference's first layers, reused by the policy forward
        self._lean_lora_layers, self._lean_attentions = [], []  # run with fewer module calls in the loss
        if not args.torch_compile:  # it wraps the layers
            if self.is_lora and not args.sft:
                self._shared_prefix = SharedFrozenPrefix(unet, frozen)
            self._lean_lora_layers = plain_lora_linears(self._lora_layers)
            unets = [unet] if self.ref_unet is None else [unet, self.ref_unet]
            self._lean_attentions = plain_attentions(module for model in unets for module in model.modules())
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._caches: dict[str, LatentCache] = {}
        self._before_samples = None
        if args.cache_latents:
            for mode, dataset in (("train", train_dataset), ("eval", eval_dataset)):
                if dataset is not None:
                    flips = (False, True) if mode == "train" and not args.no_hflip else (False,)
                    build = functools.partial(self._build_cache, dataset, flips, mode)
                    self._caches[mode] = shared_latent_cache(build, args.output_dir, f"latent-cache-{mode}")

    def train(self, *args, **kwargs):
        """``Trainer.train``, without two walks over every UNet module at every step: the UNet's ``train()`` returns
        at once when it is already in training mode (a LoRA's frozen layers stay in inference mode), and
        ``zero_grad()`` clears the trained parameters only (the frozen ones never hold gradients)."""
        unet = self.model
        unet.train = functools.partial(_train_unless_training, unet, self._frozen_layers)
        unet.zero_grad = functools.partial(_zero_grads, self._trainable_parameters)
        try:
            return super().train(*args, **kwargs)
        finally:
            del unet.train, unet.zero_grad

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
        with datasets_bars_disabled():  # an internal flattening of the kept rows, not a step of its own
            return pairs.select_columns(["prompt", "chosen", "rejected"]).add_column("pair_index", range(len(pairs)))

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches come from the deterministic collator: center crops, no flip, no caption dropout."""
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states (and SDXL's pooled embedding), each distinct prompt encoded once;
        SDXL's empty prompts become zeros."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(prompt) for prompt in prompts], device=self.accelerator.device)
        hidden, pooled = self._encode_unique_prompts(unique)
        return hidden[index], pooled[index] if pooled is not None else None

    def _encode_unique_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.accelerator.device
        if not self.is_sdxl:
            return self.pipeline.text_encoder(self._tokenize(self.pipeline.tokenizer, prompts).to(device))[0], None
        hidden, pooled = [], None
        pairs = (
            (self.pipeline.tokenizer, self.pipeline.text_encoder),
            (self.pipeline.tokenizer_2, self.pipeline.text_encoder_2),
        )
        for tokenizer, encoder in pairs:
            output = encoder(self._tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        embeds = torch.cat(hidden, dim=-1)
        empty = torch.tensor([p == "" for p in prompts], device=device)
        return embeds.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)

    @staticmethod
    def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def _time_ids(self, original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample."""
        target = torch.tensor([self.resolution, self.resolution]).expand(len(original_sizes), 2)
        sizes = torch.cat([original_sizes.cpu(), crop_top_lefts.cpu(), target], dim=1)
        return sizes.to(self.accelerator.device, torch.float32)

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.accelerator.device, self._vae_dtype, memory_format=torch.channels_last)
        return self.pipeline.vae.encode(pixels).latent_dist.parameters.contiguous()

    def _build_cache(self, pairs: datasets.Dataset, flips: tuple[bool, ...], mode: str) -> LatentCache:
        return build_latent_cache(
            pairs,
            self._encode_images,
            self.encode_prompts,
            self.resolution,
            flips,
            batch_size=max(1, self.args.per_device_train_batch_size),
            num_workers=self.args.dataloader_num_workers,
            description=f"Caching VAE latents and prompt embeddings ({mode})",
            show_progress=not self.args.disable_tqdm,  # TrainingArguments' switch for every bar of a run
        )

    def _batch_from_cache(self, inputs: dict[str, torch.Tensor], cache: LatentCache):
        device = self.accelerator.device
        parameters, crops, sizes, hidden, pooled = cache.batch(
            inputs["pair_index"].cpu(), inputs["flip"].cpu(), inputs["drop_prompt"].cpu()
        )
        time_ids = self._time_ids(sizes, crops) if self.is_sdxl else None
        pooled = pooled.to(device) if pooled is not None else None
        return parameters.to(device), hidden.to(device), pooled, time_ids

    def _batch_from_pixels(self, inputs: dict[str, Any]):
        pixels = torch.cat([inputs["chosen_pixel_values"], inputs["rejected_pixel_values"]])
        parameters = torch.stack(self._encode_images(pixels).chunk(2), dim=1)
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
        self._record_metrics(mode, metrics)
        return (loss, None) if return_outputs else loss

    def _compute_loss(self, model, latent_parameters, hidden, pooled, time_ids):
        """Sample the VAE latents of each pair (fresh every step, cached or not), then the loss."""
        scaling = self.pipeline.vae.config.scaling_factor
        latents = DiagonalGaussianDistribution(latent_parameters.flatten(0, 1)).sample().unflatten(0, (-1, 2))
        latents = latents * scaling
        return self._loss_from_latents(model, latents[:, 0], latents[:, 1], hidden, pooled, time_ids)

    def _loss_from_latents(self, model, latents_w, latents_l, hidden, pooled, time_ids):
        """One noise and timestep per pair, one reference forward and one policy forward on chosen+rejected; the
        policy reuses the reference's layers before the first adapter, and plain LoRA and attention layers run lean
        forwards."""
        noise = torch.randn_like(latents_w)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents_w),), device=latents_w.device
        )
        copies = 1 if self.args.sft else 2
        latents = latents_w if self.args.sft else torch.cat([latents_w, latents_l])
        noise, timesteps = noise.repeat(copies, 1, 1, 1), timesteps.repeat(copies)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        dtype = self._input_dtype
        noisy, hidden = noisy.to(dtype), hidden.repeat(copies, 1, 1).to(dtype)
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.repeat(copies, 1).to(dtype),
                "time_ids": time_ids.repeat(copies, 1).to(dtype),
            }
        shared_prefix = self._shared_prefix.shared() if self._shared_prefix else contextlib.nullcontext()
        with lean_forwards(self._lean_lora_layers, self._lean_attentions), shared_prefix:
            if self.args.sft:
                mse = per_sample_mse(model(noisy, timesteps, hidden, **kwargs).sample, target)
                return mse.mean(), {"mse/policy_chosen": mse}
            with torch.no_grad():
                ref_mse = per_sample_mse(self._reference_forward(noisy, timesteps, hidden, kwargs), target)
            mse = per_sample_mse(model(noisy, timesteps, hidden, **kwargs).sample, target)
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref_mse.chunk(2)
        losses, chosen_rewards, rejected_rewards = diffusion_dpo_loss(
            mse_w, mse_l, ref_w, ref_l, self.args.beta, self.args.loss_type
        )
        loss = losses.mean()
        if self.args.rpo_alpha is not None:  # RPO: the chosen images' own denoising loss, weighted
            loss = loss + self.args.rpo_alpha * mse_w.mean()
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": preference_accuracy(chosen_rewards, rejected_rewards),
            "mse/policy_chosen": mse_w,
            "mse/policy_rejected": mse_l,
            "mse/ref_chosen": ref_w,
            "mse/ref_rejected": ref_l,
        }
        return loss, metrics

    def _reference_forward(self, noisy, timesteps, hidden, kwargs) -> torch.Tensor:
        """The frozen reference: the UNet with its LoRA layers off (toggled directly, without walking the whole
        UNet), or the frozen copy under the same autocast as the policy."""
        if self.ref_unet is not None:
            with self.accelerator.autocast():
                return self.ref_unet(noisy, timesteps, hidden, **kwargs).sample
        self._set_adapters(False)
        try:
            return self.model(noisy, timesteps, hidden, **kwargs).sample
        finally:
            self._set_adapters(True)

    def _set_adapters(self, enabled: bool) -> None:
        """Switch the LoRA layers on or off for the reference forward. peft's ``enable_adapters`` also resets the
        adapters' ``requires_grad`` each time (a walk over their parameters, twice a step); the reference runs
        without gradients, so only the flag that the layers' forward reads is set."""
        for layer in self._lora_layers:
            layer._disable_adapters = not enabled

    def _record_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Gather all per-pair metrics in one collective; they stay on the device until logged."""
        per_pair = torch.stack([value.detach().float() for value in metrics.values()], dim=1)
        means = self.accelerator.gather_for_metrics(per_pair).mean(dim=0)
        for name, mean in zip(metrics, means):
            self._metrics[mode][name].append(mean)

    def _clip_grad_norm(self, model):
        """Clip the trained parameters only (a LoRA's few, not every UNet weight)."""
        return self.accelerator.clip_grad_norm_(self._trainable_parameters, self.args.max_grad_norm)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Evaluation draws its latents, noise and timesteps from a fixed seed, on a forked random stream: two
        evaluations of the same weights agree, and evaluating does not change the training run. The rewards and
        errors join the returned metrics (so ``metric_for_best_model`` can name them)."""
        device = self.accelerator.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed + self.args.process_index)
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        metrics = self._average_metrics("eval")
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def _average_metrics(self, mode: str) -> dict[str, float]:
        """The means of the metrics recorded since the last call, in one transfer from the device; then cleared."""
        names = [name for name, values in self._metrics[mode].items() if values]
        means = (
            torch.stack([torch.stack(self._metrics[mode][name]).mean() for name in names]).tolist() if names else []
        )
        self._metrics[mode].clear()
        return dict(zip(names, means))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._average_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    # ---- saving and loading --------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (with its LoRA config, so ``load_lora_weights`` applies the
        trained scaling) for ``load_lora_weights``; full: ``unet/``; plus ``training_args.bin`` (no tokens) and the
        card. transformers calls ``_save`` on every process; only the one that should save writes.
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

            pipeline_class.save_lora_weights(
                output_dir,
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
        else:
            unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
            if self.args.save_full_pipeline:
                components = {**self.pipeline.components, "unet": unet}
                pipeline_class(**components).save_pretrained(output_dir, safe_serialization=True)
        torch.save(self._args_without_tokens(), os.path.join(output_dir, "training_args.bin"))
        is_checkpoint = Path(output_dir).name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        self.create_model_card(output_dir=output_dir, samples=not is_checkpoint)

    def _args_without_tokens(self) -> DiffusionDPOConfig:
        """The arguments as pickled into ``training_args.bin``: every ``*_token`` field cleared."""
        args = copy.copy(self.args)
        for field in dataclasses.fields(args):
            if field.name.endswith("_token"):
                setattr(args, field.name, None)
        return args

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        unet = self.accelerator.unwrap_model(model or self.model)
        if self.is_lora:
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft.utils import set_peft_model_state_dict

            weights = os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME)
            check_lora_settings(weights, unet.peft_config["default"])
            state = load_file(weights)
            state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
            loaded = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
            unsaved = [key for key in loaded.missing_keys if "lora_" in key]  # the base weights are never saved
            if loaded.unexpected_keys or unsaved:  # peft loads what fits and says nothing of the rest
                raise ValueError(
                    f"{resume_from_checkpoint}: its LoRA does not fit this run's ({len(loaded.unexpected_keys)} saved "
                    f"weights have no place here, {len(unsaved)} of this LoRA's weights were not saved; e.g. "
                    f"{(loaded.unexpected_keys or unsaved)[0]}). Resume with the LoRA settings (lora_r, "
                    "lora_target_modules) of the run that saved it."
                )
        else:
            load_unet_weights(unet, os.path.join(resume_from_checkpoint, "unet"))

    def _load_best_model(self) -> None:
        logger.info(
            "Loading the best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric
        )
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- model card ----------------------------------------------------------------------------
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        output_dir: str | None = None,
        samples: bool = True,
        **kwargs,
    ) -> None:
        """Write the Hub model card (``README.md``) through ``ModelCardData``: license, base model (Hub ids only),
        tags, sample grid and widget, final metrics, hyperparameters, versions and citations."""
        from fifa_hf.cards import diffusion_model_card
        from fifa_hf.trainer import model_card

        self._update_card_settings(dataset_name, tags, license)
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        widget, grid, grid_shows_base = self._card_samples(output_dir) if samples else ([], None, False)
        datasets_ids = [model_card.hub_id(name) for name in self.dataset_names]
        card = diffusion_model_card(
            model_id=model_name or self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name,
            base_model=model_card.display_name(self.base_model),
            base_model_id=model_card.hub_id(self.base_model),
            is_sdxl=self.is_sdxl,
            is_lora=self.is_lora,
            hyperparameters=self._card_hyperparameters(),
            paper_citation=self._paper["citation"],
            license=self._card_license or model_card.base_model_license(self.pipeline.name_or_path) or "other",
            datasets=[d for d in datasets_ids if d],
            local_datasets=[model_card.display_name(n) for n, d in zip(self.dataset_names, datasets_ids) if not d],
            tags=[*self._tag_names, *self._card_tags],
            results=model_card.training_results(self.state.log_history),
            framework_versions=model_card.framework_versions(),
            samples=widget,
            sample_grid=grid,
            grid_shows_base=grid_shows_base,
            fifa_subset=self.fifa_subset,
        )
        card.save(os.path.join(output_dir, "README.md"))

    def _update_card_settings(self, dataset_name=None, tags=None, license=None) -> None:
        if dataset_name:
            self.dataset_names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
        if tags:
            self._card_tags = [tags] if isinstance(tags, str) else list(tags)
        if license:
            self._card_license = license

    def _card_samples(self, output_dir: str) -> tuple[list[tuple[str, str]], str | None, bool]:
        """Images of the fixed card prompts after training (and before: adapters off or the reference copy),
        saved under ``samples/``; returns the widget entries, the grid's path and whether it shows the base."""
        from fifa_hf.trainer.model_card import image_grid

        prompts, steps = list(self.args.card_sample_prompts or []), self.args.card_sample_steps
        if not prompts or steps == 0:
            return [], None, False
        unet = self.accelerator.unwrap_model(self.model)
        after = self._sample(unet, prompts, "after training")
        if self._before_samples is None and self.is_lora:
            self._set_adapters(False)
            try:
                self._before_samples = self._sample(unet, prompts, "base model")
            finally:
                self._set_adapters(True)
        elif self._before_samples is None and self.ref_unet is not None:
            self._before_samples = self._sample(self.ref_unet, prompts, "base model")
        directory = Path(output_dir) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        rows = [self._before_samples, after] if self._before_samples else [after]
        image_grid(rows).save(directory / "grid.jpg", quality=90)
        for i, image in enumerate(after):
            image.save(directory / f"{i}.jpg", quality=90)
        widget = [(prompt, f"samples/{i}.jpg") for i, prompt in enumerate(prompts)]
        return widget, "samples/grid.jpg", bool(self._before_samples)

    @contextlib.contextmanager
    def decoding_vae(self) -> Iterator[None]:
        """The VAE in the model's dtype inside the block, as diffusers' pipelines expect when they decode latents
        (SDXL's upcasts a ``force_upcast`` VAE itself); outside it, a float16 model's VAE stays in float32 to encode."""
        vae = self.pipeline.vae
        vae.to(self._input_dtype)
        try:
            yield
        finally:
            vae.to(self._vae_dtype)

    def _sample(self, unet, prompts: list[str], description: str):
        from fifa_hf.trainer.model_card import sample_images

        extra = {} if self.is_sdxl else {"requires_safety_checker": False}
        pipeline = type(self.pipeline)(**{**self.pipeline.components, "unet": unet}, **extra)
        pipeline.set_progress_bar_config(desc=f"Model card samples ({description})")
        training = unet.training
        unet.eval()
        try:
            with torch.random.fork_rng(devices=[]), self.accelerator.autocast(), self.decoding_vae():
                return sample_images(pipeline, prompts, self.args.card_sample_steps, self.resolution, self.args.seed)
        finally:
            unet.train(training)

    def _card_hyperparameters(self) -> dict[str, Any]:
        a = self.args
        return {
            "method": "SFT" if a.sft else f"Diffusion-DPO ({a.loss_type})",
            "beta": a.beta,
            **({"rpo_alpha": a.rpo_alpha} if a.rpo_alpha is not None else {}),
            "learning_rate": a.learning_rate,
            "lr_scheduler": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "optimizer": str(getattr(a.optim, "value", a.optim)),
            "weight_decay": a.weight_decay,
            "effective_batch_size": a.effective_batch_size,
            "max_steps": a.max_steps,
            "mixed_precision": "bf16" if a.bf16 else "fp16" if a.fp16 else "no",
            "resolution": self.resolution,
            "proportion_empty_prompts": a.proportion_empty_prompts,
            "training": "LoRA" if self.is_lora else "full UNet",
            **(
                {"lora_r": self._lora_config().r, "lora_alpha": self._lora_config().lora_alpha} if self.is_lora else {}
            ),
        }

    def _lora_config(self):
        return self.accelerator.unwrap_model(self.model).peft_config["default"]

    # ---- Hub -----------------------------------------------------------------------------------
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the weights and the card, then commit them (never checkpoints, logs or ``training_args.bin``) to
        ``hub_model_id``. ``kwargs`` (``dataset_name``, ``tags``, ``license``) go to the model card."""
        from fifa_hf.hub import upload_files

        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._update_card_settings(kwargs.get("dataset_name"), kwargs.get("tags"), kwargs.get("license"))
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        commit = functools.partial(
            upload_files,
            self.args.output_dir,
            self.hub_model_id,
            "model",
            MODEL_FILE_PATTERNS,
            commit_message,
            private=bool(private if private is not None else self.args.hub_private_repo),
            token=token,
            revision=revision or self.args.hub_revision,
        )
        return commit() if blocking else HfApi().run_as_future(commit)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """With ``hub_strategy`` other than ``end``: commit each checkpoint's weights and card (copied to
        ``output_dir``, as transformers does), plus the whole checkpoint folder for ``checkpoint`` strategies."""
        from fifa_hf.hub import upload_files

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        output_dir = Path(self.args.output_dir)
        for path in files_matching(checkpoint_folder, MODEL_FILE_PATTERNS):
            target = output_dir / path.relative_to(checkpoint_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        api, token, revision = HfApi(), self.args.hub_token, self.args.hub_revision
        jobs = [
            api.run_as_future(
                upload_files, output_dir, self.hub_model_id, "model", MODEL_FILE_PATTERNS, message,
                token=token, revision=revision,
            )
        ]  # fmt: skip
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else None
            jobs.append(
                api.upload_folder(
                    repo_id=self.hub_model_id,
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo or Path(checkpoint_folder).name,
                    commit_message=f"{message}, checkpoint",
                    token=token,
                    revision=revision,
                    run_as_future=True,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)
