"""fifa-hf: FiFA data filtering and Diffusion-DPO for text-to-image models, the Hugging Face way.

    from fifa_hf import DiffusionDPOConfig, DiffusionDPOTrainer, FiFAConfig, FiFAFilter

Every public name is imported on first use (PEP 562), so ``import fifa_hf`` and ``fifa-hf --help``
do not load torch, diffusers or transformers' trainer.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("fifa-hf")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_EXPORTS = {
    # data
    "load_preference_dataset": "fifa_hf.data",
    "to_preference_pairs": "fifa_hf.data",
    # scoring
    "CLIPRewardModel": "fifa_hf.scoring.rewards",
    "OpenCLIPRewardModel": "fifa_hf.scoring.rewards",
    "PrecomputedReward": "fifa_hf.scoring.rewards",
    "RewardModel": "fifa_hf.scoring.rewards",
    "load_reward_model": "fifa_hf.scoring.rewards",
    "EndpointQualityScorer": "fifa_hf.scoring.quality",
    "HeuristicQualityScorer": "fifa_hf.scoring.quality",
    "QualityScorer": "fifa_hf.scoring.quality",
    "TransformersQualityScorer": "fifa_hf.scoring.quality",
    "OfflineQualityScorer": "fifa_hf.scoring.offline_quality",
    "PromptEmbedder": "fifa_hf.scoring.diversity",
    "ScoreCache": "fifa_hf.scoring.cache",
    "add_signals": "fifa_hf.scoring.signals",
    # selection and the filter pipeline
    "select": "fifa_hf.selection",
    "FiFAConfig": "fifa_hf.filter",
    "FiFAFilter": "fifa_hf.filter",
    "reselect": "fifa_hf.filter",
    # training
    "DiffusionDPOConfig": "fifa_hf.trainer.config",
    "DiffusionDPOTrainer": "fifa_hf.trainer.trainer",
    # evaluation
    "RewardEvaluationCallback": "fifa_hf.evaluation.callback",
    "EvaluateArguments": "fifa_hf.evaluation.evaluate",
    "evaluate": "fifa_hf.evaluation.evaluate",
    "GenerationSettings": "fifa_hf.evaluation.generation",
    "generate": "fifa_hf.evaluation.generation",
    "load_prompts": "fifa_hf.evaluation.prompts",
    "compare": "fifa_hf.evaluation.scoring",
    "score": "fifa_hf.evaluation.scoring",
}

__all__ = [
    "CLIPRewardModel",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "EndpointQualityScorer",
    "EvaluateArguments",
    "FiFAConfig",
    "FiFAFilter",
    "GenerationSettings",
    "HeuristicQualityScorer",
    "OfflineQualityScorer",
    "OpenCLIPRewardModel",
    "PrecomputedReward",
    "PromptEmbedder",
    "QualityScorer",
    "RewardEvaluationCallback",
    "RewardModel",
    "ScoreCache",
    "TransformersQualityScorer",
    "add_signals",
    "compare",
    "evaluate",
    "generate",
    "load_preference_dataset",
    "load_prompts",
    "load_reward_model",
    "reselect",
    "score",
    "select",
    "to_preference_pairs",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from fifa_hf.data import load_preference_dataset, to_preference_pairs
    from fifa_hf.evaluation.callback import RewardEvaluationCallback
    from fifa_hf.evaluation.evaluate import EvaluateArguments, evaluate
    from fifa_hf.evaluation.generation import GenerationSettings, generate
    from fifa_hf.evaluation.prompts import load_prompts
    from fifa_hf.evaluation.scoring import compare, score
    from fifa_hf.filter import FiFAConfig, FiFAFilter, reselect
    from fifa_hf.scoring.cache import ScoreCache
    from fifa_hf.scoring.diversity import PromptEmbedder
    from fifa_hf.scoring.offline_quality import OfflineQualityScorer
    from fifa_hf.scoring.quality import (
        EndpointQualityScorer,
        HeuristicQualityScorer,
        QualityScorer,
        TransformersQualityScorer,
    )
    from fifa_hf.scoring.rewards import (
        CLIPRewardModel,
        OpenCLIPRewardModel,
        PrecomputedReward,
        RewardModel,
        load_reward_model,
    )
    from fifa_hf.scoring.signals import add_signals
    from fifa_hf.selection import select
    from fifa_hf.trainer.config import DiffusionDPOConfig
    from fifa_hf.trainer.trainer import DiffusionDPOTrainer
