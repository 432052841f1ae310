"""FiFA's three signals: preference margin, prompt quality and prompt diversity (one module each)."""

from fifa_hf.scoring.cache import ScoreCache
from fifa_hf.scoring.diversity import (
    PromptEmbedder,
    diversity_by_prompt,
    knn_distances,
    knn_log_distances,
    knn_search,
)
from fifa_hf.scoring.margin import MarginScorer
from fifa_hf.scoring.offline_quality import OfflineQualityScorer
from fifa_hf.scoring.quality import (
    QUALITY_RUBRIC,
    EndpointQualityScorer,
    HeuristicQualityScorer,
    QualityScorer,
    TransformersQualityScorer,
)
from fifa_hf.scoring.rewards import CLIPRewardModel, OpenCLIPRewardModel, PrecomputedReward, RewardModel
from fifa_hf.scoring.signals import add_prompt_signals, add_signals

__all__ = [
    "QUALITY_RUBRIC",
    "CLIPRewardModel",
    "EndpointQualityScorer",
    "HeuristicQualityScorer",
    "MarginScorer",
    "OfflineQualityScorer",
    "OpenCLIPRewardModel",
    "PrecomputedReward",
    "PromptEmbedder",
    "QualityScorer",
    "RewardModel",
    "ScoreCache",
    "TransformersQualityScorer",
    "add_prompt_signals",
    "add_signals",
    "diversity_by_prompt",
    "knn_distances",
    "knn_search",
    "knn_log_distances",
]
