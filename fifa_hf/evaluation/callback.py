"""A trainer callback that logs the mean reward of samples on a fixed prompt set every N steps."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from fifa_hf.evaluation.generation import Generation, GenerationSettings, generate
from fifa_hf.evaluation.report import image_grid
from fifa_hf.evaluation.scoring import score
from fifa_hf.scoring.rewards import RewardModel


class RewardEvaluationCallback(TrainerCallback):
    """Every ``eval_steps`` optimizer steps (and at step 0), sample the trained pipeline on ``prompts`` with
    fixed seeds and log ``eval_reward/<name>`` for each reward model (``eval/reward/<name>`` in TensorBoard and
    W&B): the reward-vs-step curve of FiFA's Figure 1a. ``<name>`` is the reward model's ``name``, which
    defaults to its checkpoint's. ``history`` keeps ``(step, {name: mean})`` for plotting.

    The samples stay in ``samples_dir`` (default ``<output_dir>/eval_samples``), one ``step-<N>`` folder per
    evaluation, and a grid of the first ``grid_prompts`` goes to TensorBoard when it is a ``report_to``
    tracker. The rewards are written to ``log_history`` and the trackers directly rather than through
    ``Trainer.log``, which would cancel the trainer's own log (loss, grad_norm, learning_rate) at that step.

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
        samples_dir: str | Path | None = None,
        grid_prompts: int = 8,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1, got {eval_steps}.")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.reward_models = list(reward_models)
        self.eval_steps = eval_steps
        self.settings = settings or GenerationSettings(num_inference_steps=20)
        self.at_start = at_start
        self.samples_dir = Path(samples_dir or Path(trainer.args.output_dir) / "eval_samples")
        self.grid_prompts = grid_prompts
        self.history: list[tuple[int, dict[str, float]]] = []

    def evaluate(self, directory: str | Path) -> tuple[dict[str, float], list[Generation]]:
        """Mean reward per model of fresh samples from the trainer's current pipeline, saved in ``directory``."""
        directory = Path(directory)
        if directory.exists():  # images of an earlier run in the same output_dir: never score them as ours
            shutil.rmtree(directory)
        pipeline = self.trainer.pipeline
        unet = pipeline.unet
        was_training = unet.training
        unet.eval()
        try:
            with self.trainer.decoding_vae():
                generations = generate(pipeline, self.prompts, directory, self.settings)
            scores = score(generations, self.reward_models)
        finally:
            unet.train(was_training)
        return {name: float(np.nanmean(values)) for name, values in scores.items()}, generations

    def _evaluate_and_log(self, args, state, control) -> None:
        if not state.is_world_process_zero or any(step == state.global_step for step, _ in self.history):
            return
        means, generations = self.evaluate(self.samples_dir / f"step-{state.global_step}")
        self.history.append((state.global_step, means))
        logs = {f"eval_reward/{name}": value for name, value in means.items()}
        state.log_history.append({**logs, "step": state.global_step})
        should_log = control.should_log  # the handler clears it; the trainer's scheduled log must still happen
        self.trainer.callback_handler.on_log(args, state, control, logs=logs)
        control.should_log = should_log
        self._send_samples(state.global_step, generations)

    def _send_samples(self, step: int, generations: list[Generation]) -> None:
        writers = [
            callback.tb_writer
            for callback in self.trainer.callback_handler.callbacks
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None
        ]
        if not writers:
            return
        shown = [g for g in generations if g.image_index == 0][: self.grid_prompts]
        rows = [shown[i : i + 4] for i in range(0, len(shown), 4)]
        grid = image_grid(
            [[g.image() for g in row] for row in rows], [" | ".join(g.prompt for g in row) for row in rows]
        )
        for writer in writers:
            writer.add_image("eval/samples", np.asarray(grid), step, dataformats="HWC")
            writer.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start:
            self._evaluate_and_log(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._evaluate_and_log(args, state, control)
