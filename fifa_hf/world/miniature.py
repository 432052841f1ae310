"""FiFA's Figure 1a in miniature, built to detect an effect: Diffusion-DPO on subsets of the synthetic world.

Every arm starts from the same pre-trained world model (``world_model.py``) and trains through
``DiffusionDPOTrainer`` with the same K, optimizer, batch and step budget; the subsets come from the real
``FiFAFilter`` and ``apply_selection`` (an arm that is not ``base``, ``full`` or an oracle is a selection
method, looked up by name). Samples of held-out prompts are read back from pixels: the world's true reward,
per attribute, and the harm marker (``shows_harm``).

The design (``docs/miniature/preregistration.md``) has two stages:

- **stage 0**, gates that must pass before any comparison: the base model follows prompts and draws the
  harm marker, the pixel reader agrees with an independent reading of generated images, the Diffusion-DPO
  settings are chosen on the *full* arm with validation worlds and prompts (no drift of the policy's
  denoising error on chosen images above the reference's), DPO on the oracle subset beats the base model
  and the same subset with shuffled labels does not move it;
- **stage 1**, the comparison: every arm on the test worlds x training seeds, each run paired with the
  others of its (world seed, training seed) block through common random numbers (the same prompts, the
  same initial noise for every image).

Every run writes one JSON file when it finishes, named by what it is and keyed by a fingerprint of every
input that can change its result; a re-run skips the finished ones and redoes stale ones, so the
experiment can be completed in pieces, on a GPU with many worker processes or on CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from fifa_hf.world.miniature_report import (
    SAMPLE_PROMPTS,
    relative_drift,
    stage0_gates,
    summarize_arms,
    write_report,
)
from fifa_hf.world.reference_reading import ATTRIBUTES
from fifa_hf.world.synthetic import (
    TEMPLATES,
    UNSAFE_SUFFIXES,
    Attributes,
    describe,
    make_synthetic_pickapic,
    parse_prompt,
    truth,
)
from fifa_hf.world.world_model import IMAGE_SIZE, shipped_world_model

ARMS = ("base", "full", "random", "margin", "qsd", "fifa", "setwise", "oracle")
CONTROL_ARMS = ("base", "oracle", "shuffled_oracle")
DATA_ARMS = ("full", "oracle", "shuffled_oracle")  # every other trained arm is a selection method's name
SPLIT_SEEDS = {"validation": 1, "test": 2}
SUBSETS_FORMAT = 3  # bumped whenever the way subsets are derived changes, so older world files are redone


@dataclass(frozen=True)
class TrainingSettings:
    """The Diffusion-DPO settings that stage 0 chooses and stage 1 uses for every arm."""

    learning_rate: float
    beta: float
    lora_rank: int  # 0 trains the whole UNet against a frozen copy
    train_steps: int  # optimizer updates
    rpo_alpha: float | None = None  # weight of the chosen images' denoising loss (DiffusionDPOConfig.rpo_alpha)
    loss_type: str = "sigmoid"  # DiffusionDPOConfig.loss_type

    @property
    def slug(self) -> str:
        rpo = f"-rpo{self.rpo_alpha:g}" if self.rpo_alpha is not None else ""
        loss = f"-{self.loss_type}" if self.loss_type != "sigmoid" else ""
        return f"r{self.lora_rank}-lr{self.learning_rate:g}-b{self.beta:g}{rpo}{loss}-n{self.train_steps}"


@dataclass
class MiniatureArguments:
    """The miniature replication's design; the defaults are the pre-registered experiment."""

    # The world (docs/world.md) and the subsets.
    num_pairs: int = 3000
    k: float = 0.1
    label_temperature: float = 0.1
    proxy_noise: float = 0.15
    quality_scorer: str = "offline"
    alpha: float = 1.0
    gamma: float = 1.0
    arms: tuple[str, ...] = ARMS
    world_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    control_world_seeds: tuple[int, ...] = (100, 101, 102, 103, 104)
    sweep_world_seeds: tuple[int, ...] = (200,)
    training_seeds: tuple[int, ...] = (0, 1, 2)
    # Diffusion-DPO. The defaults are the settings without a sweep (``quick``); with ``sweep`` stage 0 chooses
    # them on the grid. An update is ``batch_size`` x ``gradient_accumulation_steps`` pairs (amendment 4).
    learning_rate: float = 1e-4
    beta: float = 500.0
    lora_rank: int = 0
    train_steps: int = 300
    rpo_alpha: float | None = 250.0
    loss_type: str = "sigmoid"
    batch_size: int = 16
    gradient_accumulation_steps: int = 4
    sweep: bool = True
    sweep_grid: tuple[tuple[int, float, float, float | None, str], ...] = (
        (0, 1e-4, 500.0, 250.0, "sigmoid"), (0, 1e-4, 500.0, 500.0, "sigmoid"), (0, 3e-4, 500.0, 500.0, "sigmoid"),
    )  # (lora_rank, learning_rate, beta, rpo_alpha, loss_type); lora_rank 0 trains the whole UNet; amendment 5  # fmt: skip
    sweep_steps: tuple[int, ...] = (300, 600)
    drift_tolerance: float = 0.01
    # Evaluation: every run is evaluated ``evaluations`` times, evenly spaced; the endpoint is the mean of
    # the last three.
    evaluations: int = 3
    eval_clean_prompts: int = 160
    eval_unsafe_prompts: int = 64
    images_per_prompt: int = 1
    sampling_steps: int = 10
    guidance_scale: float = 3.0
    reader_check_images: int = 128
    bf16: bool = True  # bf16 autocast for sampling (5x faster on CPUs with AMX)
    train_bf16: bool = False  # bf16 autocast for training: on this CPU fp32 trains 1.46x faster (amendment 4)
    # Machinery.
    model: str | None = None
    output_dir: str = "fifa_demo_full"
    device: str = "auto"
    workers: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> MiniatureArguments:
        """A reduced version of the design for anyone to try (about 15 minutes on 2 CPU cores): 2 test and
        2 control worlds, one training seed, no sweep, 24 updates instead of 300, fewer prompts; too small for
        confident intervals."""
        values = dict(
            world_seeds=(0, 1), control_world_seeds=(100, 101), training_seeds=(0,), sweep=False, train_steps=24,
            eval_clean_prompts=48, eval_unsafe_prompts=16, reader_check_images=32,
        )  # fmt: skip
        return cls(**{**values, **overrides})

    @property
    def pairs_per_update(self) -> int:
        """Pairs in a full update (the last update of a pass over a subset may hold fewer)."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def settings(self) -> TrainingSettings:
        return TrainingSettings(
            self.learning_rate, self.beta, self.lora_rank, self.train_steps, self.rpo_alpha, self.loss_type
        )

    def resolved_model(self) -> str:
        return self.model or str(shipped_world_model())

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def world_fields(self) -> dict[str, Any]:
        names = ("num_pairs", "k", "label_temperature", "proxy_noise", "quality_scorer", "alpha", "gamma")
        return {name: getattr(self, name) for name in names}

    def evaluation_fields(self) -> dict[str, Any]:
        names = (
            "eval_clean_prompts", "eval_unsafe_prompts", "images_per_prompt", "sampling_steps", "guidance_scale",
            "batch_size", "gradient_accumulation_steps", "reader_check_images", "bf16", "train_bf16",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class RunSpec:
    """One run: an arm trained (or, for ``base``, only evaluated) in one (world seed, training seed) block."""

    stage: str  # sweep, control or main
    arm: str
    world_seed: int
    training_seed: int
    split: str  # the prompts evaluated: validation or test
    settings: TrainingSettings | None  # None for base
    eval_steps: tuple[int, ...]  # (0,) for base
    samples: bool = False  # keep the final samples of the first prompts for the report's grids

    @property
    def name(self) -> str:
        name = f"{self.arm}-w{self.world_seed}-s{self.training_seed}"
        return f"{name}-{self.settings.slug}" if self.stage == "sweep" and self.settings else name


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the worlds and their subsets -------------------------------------------------------------------


@lru_cache(maxsize=8)
def world_rows(world_seed: int, num_pairs: int, label_temperature: float) -> datasets.Dataset:
    """The synthetic Pick-a-Pic of one world seed, at the world model's resolution."""
    return make_synthetic_pickapic(
        num_pairs, seed=world_seed, image_size=IMAGE_SIZE, label_temperature=label_temperature, image_format="PNG"
    )


def rows_fingerprint(rows: datasets.Dataset) -> str:
    columns = ("caption", "label_0", "true_reward_0", "true_reward_1", "harm_0", "harm_1", "prompt_kind")
    return _digest([rows[column] for column in columns])


def usable_row_ids(rows: datasets.Dataset) -> np.ndarray:
    """Rows the filter and the trainer keep: labelled, two different images, not a tie."""
    label = np.asarray(rows["label_0"])
    keep = np.asarray(rows["has_label"]) & np.asarray(rows["are_different"]) & (label != 0.5)
    return np.flatnonzero(keep)


def pair_truth(rows: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Truth (true reward minus harm) of each row's chosen and rejected image, by its human label."""
    truth_0 = truth(rows["true_reward_0"], rows["harm_0"])
    truth_1 = truth(rows["true_reward_1"], rows["harm_1"])
    chosen_is_0 = np.asarray(rows["label_0"]) == 1.0
    return np.where(chosen_is_0, truth_0, truth_1), np.where(chosen_is_0, truth_1, truth_0)


def oracle_row_ids(rows: datasets.Dataset, count: int) -> np.ndarray:
    """The upper bound: the ``count`` usable pairs with the largest true gap (truth of chosen minus rejected)."""
    from fifa_hf.selection import top_k

    usable = usable_row_ids(rows)
    chosen, rejected = pair_truth(rows)
    return usable[top_k((chosen - rejected)[usable], count, usable)]


def subset_composition(rows: datasets.Dataset, row_ids: np.ndarray, swapped: np.ndarray | None = None) -> dict:
    """What a subset teaches, judged against the truth: label agreement, true gap, junk and unsafe shares, and
    the share of pairs whose chosen image shows the harm marker and whose rejected image does not."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    chosen, rejected = pair_truth(rows)
    chosen, rejected = chosen[row_ids], rejected[row_ids]
    if swapped is not None:
        chosen, rejected = np.where(swapped, rejected, chosen), np.where(swapped, chosen, rejected)
    kinds = np.asarray(rows["prompt_kind"])[row_ids]
    chosen_is_0 = (np.asarray(rows["label_0"]) == 1.0)[row_ids]
    if swapped is not None:
        chosen_is_0 = chosen_is_0 != swapped
    harm_0, harm_1 = np.asarray(rows["harm_0"])[row_ids], np.asarray(rows["harm_1"])[row_ids]
    teaches_harm = np.where(chosen_is_0, harm_0 & ~harm_1, harm_1 & ~harm_0)
    return {
        "pairs": len(row_ids),
        "agreement": float(np.mean(np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0)))),
        "true_gap": float(np.mean(chosen - rejected)),
        "junk_share": float(np.mean(kinds == "junk")),
        "unsafe_share": float(np.mean(kinds == "unsafe")),
        "teaches_harm_share": float(np.mean(teaches_harm)),
        "distinct_prompts": int(len(set(np.asarray(rows["caption"])[row_ids]))),
    }


def _filter_config(args: MiniatureArguments, world_seed: int, output_dir: Path):
    from fifa_hf.world.demo import synthetic_filter_config

    config = synthetic_filter_config(output_dir, args.k, world_seed)
    return dataclasses.replace(config, quality_scorer=args.quality_scorer, alpha=args.alpha, gamma=args.gamma)


def _filter_key(args: MiniatureArguments, world_seed: int) -> dict | None:
    """The filter settings that decide the method arms' subsets (no paths); None without the embedding model."""
    try:
        config = _filter_config(args, world_seed, Path("filter")).to_dict()
    except ImportError:
        return None
    config["embedding_model"] = Path(config["embedding_model"]).name
    return {name: value for name, value in config.items() if name not in ("output_dir", "cache_dir")}


def prepare_world(world_seed: int, arms: tuple[str, ...], args: MiniatureArguments, output_dir: Path) -> dict:
    """Every arm's training rows for one world seed, written to ``worlds/w<seed>.json`` and reused while the
    world and the filter settings are unchanged and it holds every arm asked for (so a GPU machine without the
    embedding model can train on subsets chosen elsewhere)."""
    path = output_dir / "worlds" / f"w{world_seed}.json"
    rows = world_rows(world_seed, args.num_pairs, args.label_temperature)
    methods = [arm for arm in arms if arm not in (*DATA_ARMS, "base")]
    key = {
        "format": SUBSETS_FORMAT,
        "rows": rows_fingerprint(rows),
        "world": args.world_fields(),
        "arms": sorted(arms),
    }
    filter_key = _filter_key(args, world_seed) if methods else None
    if filter_key is not None:
        key["filter"] = filter_key
    if path.exists():
        world = json.loads(path.read_text())
        stored = dict(world["key"])
        if filter_key is None:  # no method asked for, or no embedding model here: trust the subsets chosen elsewhere
            stored.pop("filter", None)
        stored_arms = stored.pop("arms")
        if stored == {name: value for name, value in key.items() if name != "arms"} and set(arms) <= set(stored_arms):
            return world  # prepared for these arms and perhaps more: a call asking for fewer reuses it as it is
    if methods and filter_key is None:
        _filter_config(args, world_seed, Path("filter"))  # raises the missing package's error and its fix
    usable = usable_row_ids(rows)
    from fifa_hf.selection import resolve_k

    count = resolve_k(args.k, len(usable))
    subsets: dict[str, list[int]] = {}
    swapped: list[bool] = []
    if "full" in arms:
        subsets["full"] = usable.tolist()
    if "oracle" in arms or "shuffled_oracle" in arms:
        oracle = oracle_row_ids(rows, count)
        if "oracle" in arms:
            subsets["oracle"] = oracle.tolist()
        if "shuffled_oracle" in arms:
            subsets["shuffled_oracle"] = oracle.tolist()
            # Exactly half the labels swapped, at random: the labels carry no information about the truth.
            swapped = (np.random.default_rng([world_seed, 7]).permutation(len(oracle)) < len(oracle) // 2).tolist()
    world = {"world_seed": world_seed, "key": key, "k": count, "subsets": subsets, "swapped": swapped}
    if methods:
        world.update(_select_methods(rows, methods, world_seed, args, output_dir / "worlds" / f"w{world_seed}-filter"))
        subsets.update(world.pop("method_subsets"))
    sizes = {arm: len(ids) for arm, ids in subsets.items() if arm != "full"}
    if any(size > count for size in sizes.values()) or any(sizes.get(arm, count) != count for arm in DATA_ARMS[1:]):
        # A method may keep fewer than K (setwise's quality gate can leave fewer pairs); none may keep more.
        raise RuntimeError(f"World {world_seed}: subset sizes {sizes} do not fit K = {count}.")
    world["composition"] = {
        arm: subset_composition(rows, np.asarray(ids), np.asarray(swapped) if arm == "shuffled_oracle" else None)
        for arm, ids in subsets.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, world)
    return world


def _select_methods(rows, methods: list[str], world_seed: int, args: MiniatureArguments, filter_dir: Path) -> dict:
    from fifa_hf.filter import FiFAFilter, apply_selection
    from fifa_hf.world.demo import add_simulated_proxy_reward

    config = _filter_config(args, world_seed, filter_dir)
    result = FiFAFilter(config).run(add_simulated_proxy_reward(rows, args.proxy_noise, world_seed))
    method_subsets = {}
    for method in methods:
        chosen = apply_selection(result.scores, dataclasses.replace(config, method=method))
        method_subsets[method] = chosen.loc[chosen["selected"]].sort_values("rank")["row_id"].astype(int).tolist()
    return {"method_subsets": method_subsets, "filter_config": config.to_dict()}


def training_rows(rows: datasets.Dataset, world: dict, arm: str) -> datasets.Dataset:
    """The Pick-a-Pic rows an arm trains on; for the shuffled oracle, half the labels swapped at random."""
    subset = rows.select(world["subsets"][arm])
    if arm != "shuffled_oracle":
        return subset
    swapped = np.asarray(world["swapped"])
    label_0 = np.where(swapped, 1.0 - np.asarray(subset["label_0"]), np.asarray(subset["label_0"]))
    subset = subset.remove_columns(["label_0", "label_1"])
    return subset.add_column("label_0", label_0.tolist()).add_column("label_1", (1.0 - label_0).tolist())


# ---- evaluation ----------------------------------------------------------------------------------------


@dataclass
class EvaluationSet:
    """Held-out prompts (one entry per image) and each image's initial noise: common random numbers, the
    same for every arm of a (world seed, training seed) block."""

    prompts: list[str]
    kinds: list[str]  # clean or unsafe
    targets: list[Attributes]
    latents: torch.Tensor


def _split_of(attributes: Attributes) -> str:
    """Every attribute combination belongs to the validation or the test prompts, never to both."""
    digest = hashlib.sha256(repr(dataclasses.astuple(attributes)).encode()).digest()
    return "validation" if digest[0] % 2 == 0 else "test"


def evaluation_prompts(rows: datasets.Dataset, split: str, world_seed: int, args: MiniatureArguments):
    """Clean and unsafe prompts whose attribute combination is in ``split`` and never asked for in the world's
    training data; the unsafe ones carry one of the world's unsafe requests."""
    seen = {parse_prompt(caption) for caption in set(rows["caption"])} - {None}
    rng = np.random.default_rng([world_seed, SPLIT_SEEDS[split], 11])
    prompts: list[tuple[str, str, Attributes]] = []
    taken: set[str] = set()
    wanted = {"clean": args.eval_clean_prompts, "unsafe": args.eval_unsafe_prompts}
    for kind in ("clean", "unsafe"):
        attempts = 0
        while sum(k == kind for _, k, _ in prompts) < wanted[kind]:
            attempts += 1
            if attempts > 100_000:
                raise ValueError(f"Not enough held-out {split} prompts for {wanted[kind]} {kind} prompts.")
            target = Attributes.random(rng)
            prompt = describe(target, int(rng.integers(len(TEMPLATES))))
            if kind == "unsafe":
                prompt = f"{prompt}, {rng.choice(UNSAFE_SUFFIXES)}"
            if _split_of(target) == split and target not in seen and prompt not in taken:
                taken.add(prompt)
                prompts.append((prompt, kind, target))
    # Interleave so that the first prompts (the sample grids) hold both kinds.
    clean = [p for p in prompts if p[1] == "clean"]
    unsafe = [p for p in prompts if p[1] == "unsafe"]
    ordered = [*clean[:6], *unsafe[:2], *clean[6:], *unsafe[2:]]
    return ordered


def evaluation_set(rows, split: str, world_seed: int, training_seed: int, args: MiniatureArguments, latent_shape):
    prompts = evaluation_prompts(rows, split, world_seed, args)
    repeated = [p for p in prompts for _ in range(args.images_per_prompt)]
    generator = torch.Generator("cpu").manual_seed(int(_digest([world_seed, training_seed, split])[:8], 16))
    latents = torch.randn((len(repeated), *latent_shape), generator=generator)
    return EvaluationSet(
        [p for p, _, _ in repeated], [k for _, k, _ in repeated], [t for _, _, t in repeated], latents
    )


@torch.no_grad()
def sample_images(pipeline, evaluation: EvaluationSet, args: MiniatureArguments, batch_size: int) -> list[Image.Image]:
    """Sample every image of the set from its fixed initial noise (deterministic DDIM)."""
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.unet.device
    images = []
    for start in range(0, len(evaluation.prompts), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            output = pipeline(
                prompt=evaluation.prompts[start : start + batch_size],
                latents=evaluation.latents[start : start + batch_size].to(device, pipeline.unet.dtype),
                num_inference_steps=args.sampling_steps,
                guidance_scale=args.guidance_scale,
                output_type="np",
            ).images
        images += [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in output]
    return images


def score_images(images: list[Image.Image], evaluation: EvaluationSet) -> dict[str, Any]:
    """The true reward (clean and unsafe prompts), per-attribute accuracy (clean), the harm rate (unsafe and
    clean prompts) and the truth (true reward minus harm, every prompt) of a set of samples."""
    from fifa_hf.world.true_reward import read_attributes, shows_harm

    correct = np.zeros((len(images), len(ATTRIBUTES)))
    harm = np.zeros(len(images))
    for i, (image, target) in enumerate(zip(images, evaluation.targets)):
        shown = read_attributes(image)
        correct[i] = [shown[name] == getattr(target, name) for name in ATTRIBUTES]
        harm[i] = shows_harm(image)
    clean = np.asarray(evaluation.kinds) == "clean"
    reward = correct.mean(axis=1)
    return {
        "true_reward": float(reward[clean].mean()),
        "attributes": {name: float(correct[clean, j].mean()) for j, name in enumerate(ATTRIBUTES)},
        "true_reward_unsafe": float(reward[~clean].mean()) if (~clean).any() else float("nan"),
        "harm_rate": float(harm[~clean].mean()) if (~clean).any() else float("nan"),
        "harm_rate_clean": float(harm[clean].mean()),
        "truth": float((reward - harm).mean()),
    }


def _evaluate(pipeline, evaluation, args, batch_size, step):
    images = sample_images(pipeline, evaluation, args, batch_size)
    return {"step": step, **score_images(images, evaluation)}, images


def _sample_strip(images: list[Image.Image]) -> Image.Image:
    strip = Image.new("RGB", (IMAGE_SIZE * len(images), IMAGE_SIZE))
    for i, image in enumerate(images):
        strip.paste(image, (i * IMAGE_SIZE, 0))
    return strip


# ---- one run ------------------------------------------------------------------------------------------


def _lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian",
        target_modules=["conv1", "conv2"],  # every residual block's two convolutions
    )  # fmt: skip


def execute_run(spec: RunSpec, args: MiniatureArguments, model: str, fingerprint: str) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate one run; write its result file and return the result."""
    from transformers import PrinterCallback, TrainerCallback

    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer, load_pipeline
    from fifa_hf.world.reference_reading import reader_agreement_counts

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    device = args.resolved_device()
    batch_size = 512 if device.startswith("cuda") else 64
    rows = world_rows(spec.world_seed, args.num_pairs, args.label_temperature)
    world = json.loads((output_dir / "worlds" / f"w{spec.world_seed}.json").read_text())
    latent_shape = (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    evaluation = evaluation_set(rows, spec.split, spec.world_seed, spec.training_seed, args, latent_shape)
    result: dict[str, Any] = {"spec": dataclasses.asdict(spec), "fingerprint": fingerprint, "device": device}
    if spec.settings is None:
        pipeline = load_pipeline(model).to(device)
        summary, images = _evaluate(pipeline, evaluation, args, batch_size, 0)
        result["curve"] = [summary]
    else:
        settings = spec.settings
        data = training_rows(rows, world, spec.arm)
        with tempfile.TemporaryDirectory() as scratch:
            config = DiffusionDPOConfig(
                output_dir=scratch, max_steps=settings.train_steps, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps, rpo_alpha=settings.rpo_alpha,
                loss_type=settings.loss_type,
                learning_rate=settings.learning_rate, lr_scheduler_type="constant_with_warmup",
                warmup_steps=min(10, settings.train_steps // 10), beta=settings.beta, resolution=IMAGE_SIZE,
                cache_latents=True, logging_steps=max(1, min(spec.eval_steps) // 3), save_strategy="no",
                report_to="none", use_cpu=device == "cpu", seed=spec.training_seed, disable_tqdm=True, bf16=args.train_bf16,
            )  # fmt: skip
            peft_config = _lora_config(settings.lora_rank) if settings.lora_rank else None
            trainer = DiffusionDPOTrainer(model, config, train_dataset=data, peft_config=peft_config)
            trainer.remove_callback(PrinterCallback)  # the curve is the run's output, not per-step log lines
            curve, last = [], {}

            class Evaluate(TrainerCallback):
                def on_step_end(self, train_args, state, control, **kwargs):
                    if state.global_step in spec.eval_steps:
                        unet = trainer.pipeline.unet
                        unet.eval()
                        summary, last["images"] = _evaluate(
                            trainer.pipeline, evaluation, args, batch_size, state.global_step
                        )
                        unet.train()
                        curve.append(summary)

            trainer.add_callback(Evaluate())
            trainer.train()
            images = last["images"]
        result["curve"] = curve
        result["train_pairs"] = len(trainer.train_dataset)
        names = "per_device_train_batch_size", "gradient_accumulation_steps", "rpo_alpha", "loss_type", "beta", "bf16"
        result["trainer_args"] = {name: getattr(trainer.args, name) for name in names}
        result["drift"] = [
            {
                "step": entry["step"],
                "chosen": entry["mse/policy_chosen"] - entry["mse/ref_chosen"],
                "rejected": entry["mse/policy_rejected"] - entry["mse/ref_rejected"],
                "ref_chosen": entry["mse/ref_chosen"],
            }
            for entry in trainer.state.log_history
            if "mse/ref_chosen" in entry
        ]
    if spec.stage != "main" or spec.samples:
        result["reader_agreement"] = reader_agreement_counts(images[: args.reader_check_images])
    if spec.samples:
        strip = _sample_strip(images[: SAMPLE_PROMPTS * args.images_per_prompt : args.images_per_prompt])
        path = output_dir / "samples" / spec.stage / f"{spec.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        strip.save(path)
    result["seconds"] = time.perf_counter() - start
    _write_json(run_path(output_dir, spec), result)
    return result


def _write_json(path: Path, value: Any) -> None:
    """Write atomically, so an interrupted run never leaves a half-written result to be skipped later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def run_path(output_dir: Path, spec: RunSpec) -> Path:
    return output_dir / "runs" / spec.stage / f"{spec.name}.json"


def run_fingerprint(spec: RunSpec, args: MiniatureArguments, model_fingerprint: str, world: dict) -> str:
    """Everything a run's result depends on: a result file with another fingerprint is stale. The world enters
    through its rows and the run's own subset, not through the other arms its world file was prepared for, so
    a run stays finished whichever arms a call asks for."""
    subset = world["subsets"].get(spec.arm) if spec.settings is not None else None
    rows = {name: value for name, value in world["key"].items() if name not in ("arms", "filter")}
    return _digest(
        [dataclasses.asdict(spec), args.world_fields(), args.evaluation_fields(), model_fingerprint, rows, subset]
    )


def model_fingerprint(model: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(model).rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".txt"):
            digest.update(path.relative_to(model).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _init_worker() -> None:
    import diffusers
    import transformers

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()  # loading a tiny pipeline is no long step
    transformers.utils.logging.disable_progress_bar()


def _run_task(task: tuple[RunSpec, MiniatureArguments, str, str]) -> str:
    spec, args, model, fingerprint = task
    execute_run(spec, args, model, fingerprint)
    return spec.name


def prepare_worlds(specs: list[RunSpec], args: MiniatureArguments) -> dict[int, dict]:
    """The subsets of every world the specs train in (``prepare_world``)."""
    worlds = {}
    for world_seed in sorted({spec.world_seed for spec in specs}):
        arms = tuple(sorted({spec.arm for spec in specs if spec.world_seed == world_seed} - {"base"}))
        worlds[world_seed] = prepare_world(world_seed, arms, args, Path(args.output_dir))
    return worlds


def run_all(specs: list[RunSpec], args: MiniatureArguments, description: str) -> list[dict[str, Any]]:
    """Run every spec whose result file is missing or stale (in ``args.workers`` processes), then load them all."""
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    model = args.resolved_model()
    tasks = [(spec, args, model, fingerprint) for spec, fingerprint in unfinished_runs(specs, args, model).items()]
    with tqdm(total=len(tasks), desc=f"{description} ({len(specs) - len(tasks)} of {len(specs)} runs done)") as bar:
        if args.workers > 1 and len(tasks) > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
                for future in as_completed([pool.submit(_run_task, task) for task in tasks]):
                    future.result()
                    bar.update()
        else:
            for task in tasks:
                _run_task(task)
                bar.update()
    return [json.loads(run_path(output_dir, spec).read_text()) for spec in specs]


def unfinished_runs(specs: list[RunSpec], args: MiniatureArguments, model: str) -> dict[RunSpec, str]:
    """The specs whose result file is missing or stale, each with the fingerprint its result will carry."""
    output_dir = Path(args.output_dir)
    model_key = model_fingerprint(model)
    worlds = prepare_worlds(specs, args)
    paths = [run_path(output_dir, spec) for spec in specs]
    if len(set(paths)) < len(paths):
        raise ValueError("Two runs would write the same result file; give each run a distinct name.")
    fingerprints = {spec: run_fingerprint(spec, args, model_key, worlds[spec.world_seed]) for spec in specs}
    return {spec: key for spec, key in fingerprints.items() if not _finished(run_path(output_dir, spec), key)}


def _finished(path: Path, fingerprint: str) -> bool:
    return path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint


# ---- the two stages -------------------------------------------------------------------------------------


def eval_steps(train_steps: int, evaluations: int) -> tuple[int, ...]:
    if train_steps % evaluations:
        raise ValueError(f"train_steps ({train_steps}) must be a multiple of evaluations ({evaluations}).")
    return tuple(train_steps // evaluations * (i + 1) for i in range(evaluations))


def endpoint_at(result: dict[str, Any], train_steps: int, evaluations: int, metric: str = "true_reward") -> float:
    """The endpoint a run of ``train_steps`` would have had, read off a longer sweep run's curve."""
    wanted = eval_steps(train_steps, evaluations)[-3:]
    values = {entry["step"]: entry[metric] for entry in result["curve"]}
    return float(np.mean([values[step] for step in wanted]))


def sweep_specs(args: MiniatureArguments) -> list[RunSpec]:
    longest = max(args.sweep_steps)
    every = min(args.sweep_steps) // args.evaluations
    steps = tuple(range(every, longest + 1, every))
    return [
        RunSpec(
            "sweep", "full", world, seed, "validation", TrainingSettings(lr, beta, rank, longest, rpo, loss), steps
        )
        for rank, lr, beta, rpo, loss in args.sweep_grid
        for world in args.sweep_world_seeds
        for seed in args.training_seeds[:1]
    ]


def choose_settings(results: list[dict[str, Any]], args: MiniatureArguments) -> tuple[TrainingSettings, list[dict]]:
    """The pre-registered rule: among (settings, steps) without drift (the policy's denoising error on chosen
    images in the second half of training at most ``drift_tolerance`` above the reference's, relatively), the
    highest validation endpoint of the full arm; ties go to fewer steps, then to the smaller learning rate."""
    table = []
    for rank, lr, beta, rpo, loss in args.sweep_grid:
        swept = TrainingSettings(lr, beta, rank, max(args.sweep_steps), rpo, loss)
        mine = [r for r in results if r["spec"]["settings"] == dataclasses.asdict(swept)]
        for steps in args.sweep_steps:
            table.append(
                {
                    "settings": dataclasses.asdict(dataclasses.replace(swept, train_steps=steps)),
                    "validation_true_reward": float(np.mean([endpoint_at(r, steps, args.evaluations) for r in mine])),
                    "drift": float(np.mean([relative_drift(r, steps) for r in mine])),
                }
            )
    eligible = [row for row in table if row["drift"] <= args.drift_tolerance]
    if not eligible:
        raise RuntimeError("Every swept setting drifts (policy error on chosen images above the reference's).")
    best = max(
        eligible,
        key=lambda row: (
            round(row["validation_true_reward"], 6),
            -row["settings"]["train_steps"],
            -row["settings"]["learning_rate"],
        ),
    )
    return TrainingSettings(**best["settings"]), table


def control_specs(args: MiniatureArguments, settings: TrainingSettings) -> list[RunSpec]:
    steps = eval_steps(settings.train_steps, args.evaluations)
    specs = []
    for world, seed in itertools.product(args.control_world_seeds, args.training_seeds):
        first = world == args.control_world_seeds[0] and seed == args.training_seeds[0]
        specs.append(RunSpec("control", "base", world, seed, "validation", None, (0,), first))
        for arm in CONTROL_ARMS[1:]:
            specs.append(RunSpec("control", arm, world, seed, "validation", settings, steps, first))
    return specs


def main_specs(args: MiniatureArguments, settings: TrainingSettings) -> list[RunSpec]:
    steps = eval_steps(settings.train_steps, args.evaluations)
    specs = []
    for world, seed in itertools.product(args.world_seeds, args.training_seeds):
        first = world == args.world_seeds[0] and seed == args.training_seeds[0]
        for arm in args.arms:
            trained = arm != "base"
            specs.append(
                RunSpec(
                    "main", arm, world, seed, "test", settings if trained else None, steps if trained else (0,), first
                )
            )
    return specs


def run_stage0(args: MiniatureArguments) -> dict[str, Any]:
    """Stage 0: choose the Diffusion-DPO settings (or take the pre-registered ones), run the controls, and
    measure every gate. Written to ``stage0.json``."""
    output_dir = Path(args.output_dir)
    # The base model's evaluations come first: they decide two gates and need no training.
    base_specs = [spec for spec in control_specs(args, args.settings) if spec.arm == "base"]
    base_results = run_all(base_specs, args, "stage 0: the base model")
    base_gates = stage0_gates(base_results, [], dataclasses.asdict(args.settings), args.drift_tolerance)
    failed = [name for name, gate in base_gates.items() if not gate["passed"]]
    if failed:  # no Diffusion-DPO run could change the verdict: stage 1 will not run
        print(f"Stage 0 stops at the base model: gate(s) {', '.join(failed)} failed; no Diffusion-DPO run is made.")
        stage0 = {
            "settings": dataclasses.asdict(args.settings), "sweep": [], "gates": base_gates, "controls": {},
            "stopped": f"the base model failed {', '.join(failed)}; the sweep and the controls were not run",
        }  # fmt: skip
        _write_json(output_dir / "stage0.json", stage0)
        return stage0
    sweep_results, table = [], []
    if args.sweep:
        sweep_results = run_all(sweep_specs(args), args, "stage 0: Diffusion-DPO settings on the full arm")
        settings, table = choose_settings(sweep_results, args)
    else:
        settings = args.settings
    control_results = run_all(control_specs(args, settings), args, "stage 0: base, positive and negative controls")
    control_args = dataclasses.replace(args, arms=CONTROL_ARMS, world_seeds=args.control_world_seeds)
    control_worlds = prepare_worlds(control_specs(args, settings), args)
    stage0 = {
        "settings": dataclasses.asdict(settings),
        "sweep": table,
        "gates": stage0_gates(control_results, sweep_results, dataclasses.asdict(settings), args.drift_tolerance),
        "controls": summarize_arms(control_results, control_args, control_worlds),
    }
    _write_json(output_dir / "stage0.json", stage0)
    return stage0


def run_experiment(args: MiniatureArguments) -> dict[str, Any]:
    """Stage 0, then, if every gate passes, stage 1; then the report (``report.md``, ``results.json``, figures)."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    stage0 = run_stage0(args)
    prompts = {}
    for split, world_seed in (("test", args.world_seeds[0]), ("validation", args.control_world_seeds[0])):
        rows = world_rows(world_seed, args.num_pairs, args.label_temperature)
        prompts[split] = [prompt for prompt, _, _ in evaluation_prompts(rows, split, world_seed, args)]
    main_results = []
    if all(gate["passed"] for gate in stage0["gates"].values()):
        specs = main_specs(args, TrainingSettings(**stage0["settings"]))
        unfinished = unfinished_runs(specs, args, args.resolved_model())
        if unfinished:  # stage 1 takes hours: report stage 0 now, in case this call is stopped before the end
            progress = (len(specs) - len(unfinished), len(specs))
            seconds = time.perf_counter() - start
            write_report(output_dir, args, stage0, [], seconds, prompts["test"], prompts["validation"], progress)
        main_results = run_all(specs, args, "stage 1: every arm")
    else:
        failed = [name for name, gate in stage0["gates"].items() if not gate["passed"]]
        print(f"Stage 0 gates failed ({', '.join(failed)}): stage 1 is not run.")
    seconds = time.perf_counter() - start
    return write_report(output_dir, args, stage0, main_results, seconds, prompts["test"], prompts["validation"])
