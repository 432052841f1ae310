"""Proxy reward models that score (prompt, image) pairs: PickScore-style CLIP, open_clip, precomputed.

Every backend exposes ``score(prompts, images) -> np.ndarray``. They load lazily and drop the loaded
weights when pickled, so they can live inside a ``datasets.map`` function with ``num_proc``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fifa_hf.errors import InputError
from fifa_hf.resolve import (
    PROCESSOR_FILES,
    TRANSFORMERS_MODEL_FILES,
    ResolutionError,
    looks_like_local_path,
    resolve_hub_reference,
    resolve_local_path,
    resolve_model_files,
)
from fifa_hf.scoring.images import CLIPImageTransform
from fifa_hf.scoring.lazy import LazyLoaded
from fifa_hf.storage import model_identity

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and a pooled output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class RewardModel(LazyLoaded, abc.ABC):
    """A reward for (prompt, image) pairs, loaded on first use on ``device``."""

    name: str = "reward"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype

    @property
    def image_size(self) -> int | None:
        """The side the model resizes images to; decoding can stop at that size."""
        return None

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """Everything its scores depend on (weights by Hub commit or file digest, processor, dtype): the filter
        reuses saved margins only for the same identity."""

    def resolve(self, flag: str) -> None:
        """Turn every checkpoint reference into a local path now (see ``fifa_hf.resolve``), so a missing model
        fails before the long work, naming ``flag``. Rewards without checkpoints have nothing to resolve."""

    @abc.abstractmethod
    def _load(self) -> Any: ...

    @abc.abstractmethod
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> np.ndarray:
        """One float per (prompt, image) pair."""


class _ContrastiveReward(RewardModel):
    """``logit_scale.exp() * cos(text, image)``: the PickScore formula, shared by CLIP-like models."""

    @abc.abstractmethod
    def _embed_text(self, prompts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    @abc.abstractmethod
    def _logit_scale(self) -> torch.Tensor: ...

    @torch.inference_mode()
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalized text embeddings (also usable as prompt embeddings for diversity)."""
        return torch.nn.functional.normalize(self._embed_text(list(prompts)).float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> np.ndarray:
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
        if not prompts:
            return np.zeros(0, dtype=np.float32)
        unique = list(dict.fromkeys(prompts))
        text = torch.nn.functional.normalize(self._embed_text(unique).float(), dim=-1)
        text = text[torch.tensor([unique.index(p) for p in prompts])]
        image = torch.nn.functional.normalize(self._embed_images(images).float(), dim=-1)
        scores = self._logit_scale().float().exp() * (text * image).sum(-1)
        return scores.cpu().numpy()


def _last_component(reference: str) -> str:
    return Path(reference.rstrip("/\\")).name or reference


class CLIPRewardModel(_ContrastiveReward):
    """PickScore (CLIP-H fine-tuned on Pick-a-Pic) or any transformers CLIP checkpoint.

    Scores are in PickScore's units (``logit_scale.exp()`` is 100 for PickScore, so about 20 for a
    good image). ``name`` (the key of its scores and logged metrics) defaults to ``pickscore`` for
    PickScore and to the checkpoint's last path component otherwise.
    """

    def __init__(
        self,
        model_name_or_path: str = PICKSCORE_MODEL,
        processor_name_or_path: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ):
        super().__init__(device, dtype)
        self.model_name_or_path = str(model_name_or_path)
        is_pickscore = self.model_name_or_path == PICKSCORE_MODEL
        if processor_name_or_path is None:
            processor_name_or_path = PICKSCORE_PROCESSOR if is_pickscore else self.model_name_or_path
        self.processor_name_or_path = str(processor_name_or_path)
        self.name = name or ("pickscore" if is_pickscore else _last_component(self.model_name_or_path))

    def resolve(self, flag: str) -> None:
        self.model_name_or_path = resolve_model_files(self.model_name_or_path, flag, TRANSFORMERS_MODEL_FILES)
        self.processor_name_or_path = resolve_hub_reference(
            self.processor_name_or_path, flag, allow_patterns=PROCESSOR_FILES
        )

    @property
    def identity(self) -> str:
        """The weights and processor (Hub commits or digests of the local files) and dtype scores come from."""
        model = model_identity(self.model_name_or_path, hub_file="config.json")
        processor = model_identity(self.processor_name_or_path, hub_file="preprocessor_config.json")
        return f"clip:{model}:{processor}:{self.dtype}"

    def _load(self):
        from transformers import AutoModel, AutoProcessor

        processor = AutoProcessor.from_pretrained(self.processor_name_or_path)
        model = AutoModel.from_pretrained(self.model_name_or_path, dtype=getattr(torch, self.dtype))
        transform = CLIPImageTransform.from_image_processor(processor.image_processor)
        return model.eval().requires_grad_(False).to(self.device), processor, transform

    @property
    def image_size(self) -> int | None:
        processor = self.loaded[1]
        crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
        return int(min(v for k, v in dict(crop).items() if k in ("height", "width", "shortest_edge")))

    def _embed_text(self, prompts: list[str]) -> torch.Tensor:
        model, processor, _ = self.loaded
        inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return _features(model.get_text_features(**inputs.to(self.device)))

    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, processor, transform = self.loaded
        if transform is None:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        else:
            pixels = transform(images)
        return _features(model.get_image_features(pixel_values=pixels.to(self.device, model.dtype)))

    def _logit_scale(self) -> torch.Tensor:
        return self.loaded[0].logit_scale


class OpenCLIPRewardModel(_ContrastiveReward):
    """An open_clip model (HPSv2-style: architecture + checkpoint), needs the ``open_clip`` extra.

    ``model_name`` is an open_clip architecture (``"ViT-H-14"``) with ``pretrained`` a checkpoint path
    or tag, or ``"local-dir:/path"`` / ``"hf-hub:org/repo"``. Images are preprocessed with PIL from the
    model's own preprocessing config (the same resize, crop and normalization open_clip applies to
    PIL images), so open_clip's torchvision transforms are never called. ``name`` defaults to the
    checkpoint's (or directory's, or repo's) last path component.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ):
        super().__init__(device, dtype)
        self.model_name, self.pretrained = model_name, pretrained
        if name is None and model_name.startswith(OPEN_CLIP_SCHEMAS):
            name = _last_component(model_name.split(":", 1)[1])
        elif name is None:
            name = Path(pretrained).stem if pretrained and Path(pretrained).suffix else model_name
        self.name = name

    def resolve(self, flag: str) -> None:
        try:
            import open_clip
        except ImportError as error:
            raise ImportError(f"{flag}: open_clip rewards need open_clip: pip install 'fifa-hf[open_clip]'") from error
        if self.model_name.startswith("local-dir:"):
            directory = resolve_local_path(self.model_name.removeprefix("local-dir:"), flag)
            self.model_name = f"local-dir:{directory}"
        elif self.model_name.startswith("hf-hub:"):
            directory = _resolve_open_clip_weights(self.model_name.removeprefix("hf-hub:"), OPEN_CLIP_WEIGHTS, flag)
            self.model_name = f"local-dir:{directory}"
        elif self.model_name not in open_clip.list_models():
            raise ResolutionError(
                f"{flag}: {self.model_name!r} is not an open_clip architecture; use one of open_clip.list_models() "
                "with a checkpoint, or local-dir:<directory> / hf-hub:<repo> for a model with its own config."
            )
        elif self.pretrained and (Path(self.pretrained).expanduser().exists() or _looks_like_file(self.pretrained)):
            self.pretrained = str(resolve_local_path(self.pretrained, flag))
        elif self.pretrained:
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            if self.pretrained not in tags:
                raise ResolutionError(
                    f"{flag}: {self.pretrained!r} is neither a checkpoint file nor a pretrained tag of {self.model_name} "
                    f"({', '.join(tags) or 'it has none'})."
                )
            location = open_clip.get_pretrained_cfg(self.model_name, self.pretrained).get("hf_hub", "")
            if location:  # download now into the cache open_clip reads; the tag keeps its preprocessing settings
                repo, weights = location.rstrip("/"), OPEN_CLIP_WEIGHTS
                if not location.endswith("/"):
                    repo, weights = repo.rsplit("/", 1)
                _resolve_open_clip_weights(repo, weights, flag)

    @property
    def identity(self) -> str:
        model = self.model_name
        if model.startswith("local-dir:"):
            model = model_identity(model.removeprefix("local-dir:"))
        return f"open_clip:{model}:{model_identity(self.pretrained)}:{self.dtype}"

    def _load(self):
        try:
            import open_clip
        except ImportError as error:
            raise ImportError("OpenCLIPRewardModel needs open_clip: pip install 'fifa-hf[open_clip]'") from error
        model = open_clip.create_model(self.model_name, pretrained=self.pretrained, device=self.device)
        model = model.to(getattr(torch, self.dtype)).eval().requires_grad_(False)
        return model, open_clip.get_tokenizer(self.model_name), _open_clip_transform(model.visual.preprocess_cfg)

    @property
    def image_size(self) -> int:
        return self.loaded[2].size

    def _embed_text(self, prompts: list[str]) -> torch.Tensor:
        model, tokenizer, _ = self.loaded
        return model.encode_text(tokenizer(prompts).to(self.device))

    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, _, transform = self.loaded
        pixels = transform(images)
        return model.encode_image(pixels.to(self.device, next(model.parameters()).dtype))

    def _logit_scale(self) -> torch.Tensor:
        return self.loaded[0].logit_scale


OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"


def _resolve_open_clip_weights(repo: str, weights: str, flag: str) -> str:
    """The snapshot of an open_clip Hub repo with its config and the weights open_clip reads: the
    safetensors twin of ``weights`` when the repo has one (as open_clip prefers), else ``weights``."""
    safe = "open_clip_model.safetensors" if weights == OPEN_CLIP_WEIGHTS else weights.replace(".bin", ".safetensors")
    directory = resolve_hub_reference(repo, flag, allow_patterns=["open_clip_config.json", "*.txt", safe])
    if not (Path(directory) / safe).exists():
        directory = resolve_hub_reference(repo, flag, allow_patterns=[weights])
    return directory


def _looks_like_file(reference: str) -> bool:
    return looks_like_local_path(reference) or Path(reference).suffix in (".pt", ".pth", ".bin", ".safetensors")


_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _open_clip_transform(config: dict[str, Any]) -> CLIPImageTransform:
    """open_clip's eval transform for PIL input (shortest-side resize, center crop, normalize)."""
    if config.get("resize_mode", "shortest") != "shortest":
        raise NotImplementedError(f"resize_mode {config['resize_mode']!r} is not supported; use 'shortest'.")
    size = config["size"] if isinstance(config["size"], int) else min(config["size"])
    return CLIPImageTransform(
        size=size,
        crop=size,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        resample=_INTERPOLATION[config.get("interpolation", "bicubic")],
        round_offset=True,
    )


class PrecomputedReward:
    """Rewards a user already computed, read from two columns of the source rows.

    For Pick-a-Pic rows the columns hold the rewards of ``jpg_0`` and ``jpg_1`` and are oriented
    with the label; for TRL rows they hold the chosen and rejected rewards.
    """

    name = "precomputed"

    def __init__(self, column_0: str, column_1: str, name: str = "precomputed"):
        self.columns = (column_0, column_1)
        self.name = name

    @property
    def identity(self) -> str:
        return f"precomputed:{','.join(self.columns)}"


REWARD_ENTRY_POINTS = "fifa_hf.rewards"


def load_reward_model(spec: str, device: str | None = None, dtype: str = "float32") -> RewardModel:
    """A reward model from a short spec, as the CLI takes them.

    - ``pickscore``: PickScore v1 with the laion CLIP-H processor;
    - ``clip:<model id or dir>``: any transformers CLIP checkpoint, scored the PickScore way;
    - ``open_clip:<architecture>[:<checkpoint or tag>]``, ``open_clip:local-dir:<dir>`` or
      ``open_clip:hf-hub:<repo>``: an open_clip model (``hpsv2:<checkpoint>`` is
      ``open_clip:ViT-H-14:<checkpoint>`` named ``hpsv2``);
    - any name registered under the ``fifa_hf.rewards`` entry point group (a class taking no
      arguments), e.g. ``synthetic``: the synthetic world's true reward, read from pixels.
    """
    kind, _, rest = spec.partition(":")
    if kind == "pickscore" and not rest:
        return CLIPRewardModel(device=device, dtype=dtype)
    if kind == "clip" and rest:
        return CLIPRewardModel(rest, device=device, dtype=dtype)
    if kind == "open_clip" and rest.startswith(OPEN_CLIP_SCHEMAS):
        return OpenCLIPRewardModel(rest, device=device, dtype=dtype)
    if kind == "open_clip" and rest:
        architecture, _, pretrained = rest.partition(":")
        return OpenCLIPRewardModel(architecture, pretrained or None, device=device, dtype=dtype)
    if kind == "hpsv2" and rest:
        return OpenCLIPRewardModel("ViT-H-14", rest, device=device, dtype=dtype, name="hpsv2")
    from importlib.metadata import entry_points

    registered = {point.name: point for point in entry_points(group=REWARD_ENTRY_POINTS)}
    if kind in registered and not rest:
        return registered[kind].load()()
    raise InputError(
        f"Unknown reward {spec!r}: use pickscore, clip:<model>, open_clip:<arch>[:<checkpoint>], open_clip:local-dir:<dir>, "
        f"hpsv2:<checkpoint> or a registered name ({', '.join(sorted(registered)) or 'none installed'})."
    )
