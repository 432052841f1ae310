"""Evaluation: generate on fixed prompt sets, score with reward models, compare with a baseline."""

from fifa_hf.evaluation.evaluate import EvaluateArguments, evaluate, load_for_evaluation
from fifa_hf.evaluation.generation import Generation, GenerationSettings, generate, prompt_seed
from fifa_hf.evaluation.prompts import load_prompts, partiprompts
from fifa_hf.evaluation.report import image_grid, markdown_table
from fifa_hf.evaluation.scoring import compare, score
from fifa_hf.evaluation.stats import bootstrap_interval, per_prompt_means, summarize, win_rate


def __getattr__(name: str):
    # The callback imports transformers' trainer stack (and peft); load it only when asked for, so the CLI
    # starts fast.
    if name == "RewardEvaluationCallback":
        from fifa_hf.evaluation.callback import RewardEvaluationCallback

        return RewardEvaluationCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvaluateArguments",
    "Generation",
    "GenerationSettings",
    "RewardEvaluationCallback",
    "bootstrap_interval",
    "compare",
    "evaluate",
    "generate",
    "image_grid",
    "load_for_evaluation",
    "load_prompts",
    "markdown_table",
    "partiprompts",
    "per_prompt_means",
    "prompt_seed",
    "score",
    "summarize",
    "win_rate",
]
