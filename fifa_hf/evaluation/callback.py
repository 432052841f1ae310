"""A trainer callback that logs the mean reward of samples on a fixed prompt set every N steps."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
from transformers import TrainerCallback

from fifa_hf.evaluation.generation import GenerationSettings, generate
from fifa_hf.evaluation.scoring import score
from fifa_hf.scoring.rewards import RewardModel


class RewardEvaluationCallback(TrainerCallback):
    """Every ``eval_steps`` optimizer steps (and at step 0), sample the trained pipeline on ``prompts`` with
    fixed seeds and log ``eval/reward/<name>`` for each reward model: the reward-vs-step curve of FiFA's
    Figure 1a in any ``report_to`` tracker. ``history`` keeps ``(step, {name: mean})`` for plotting.

    Example:
        trainer = DiffusionDPOTrainer(model, args, train_dataset=subset, peft_config=lora)
        trainer.add_callback(RewardEvaluationCallback(trainer, prompts, [CLIPRewardModel()], eval_steps=100))
    """

    def __init__(
        self,
        trainer,
        prompts: Sequence[str],
        reward_models: Sequence[RewardModel],
        eval_steps: int = 100,
        settings: GenerationSettings | None = None,
        at_start: bool = True,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1, got {eval_steps}.")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.reward_models = list(reward_models)
        self.eval_steps = eval_steps
        self.settings = settings or GenerationSettings(num_inference_steps=20)
        self.at_start = at_start
        self.history: list[tuple[int, dict[str, float]]] = []

    def evaluate(self) -> dict[str, float]:
        """Mean reward per model of fresh samples from the trainer's current pipeline."""
        pipeline = self.trainer.pipeline
        unet = pipeline.unet
        was_training = unet.training
        unet.eval()
        try:
            with tempfile.TemporaryDirectory() as directory:
                generations = generate(pipeline, self.prompts, directory, self.settings)
                scores = score(generations, self.reward_models)
        finally:
            unet.train(was_training)
        return {name: float(np.nanmean(values)) for name, values in scores.items()}

    def _log(self, state) -> None:
        if any(step == state.global_step for step, _ in self.history):
            return
        if state.is_world_process_zero:
            means = self.evaluate()
            self.history.append((state.global_step, means))
            self.trainer.log({f"eval/reward/{name}": value for name, value in means.items()})

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start:
            self._log(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._log(state)
