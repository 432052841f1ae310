"""The Diffusion-DPO objective (Wallace et al., 2023, Eq. 14) and its hinge, IPO and APO-zero variants.

The denoising error stands in for the negative log-likelihood: with per-sample MSEs of the policy
and the frozen reference on the chosen (w) and rejected (l) images,
``inside = -0.5 * beta * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))`` and the sigmoid loss is
``-logsigmoid(inside)``. ``beta`` follows the paper's convention (5000 for SD1.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "apo_zero")
# sigmoid and hinge: the paper's KL strength for SD1.5. ipo: IPO's tau, a target logit 1 / (2 * 1000) = 5e-4,
# about where the sigmoid loss at beta = 5000 is satisfied (-logsigmoid(2.5) = 0.08).
DEFAULT_BETA = {"sigmoid": 5000.0, "hinge": 5000.0, "ipo": 1000.0, "apo_zero": 5000.0}


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over C, H, W, computed in fp32 whatever the model dtype."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def diffusion_dpo_loss(
    policy_mse_chosen: torch.Tensor,
    policy_mse_rejected: torch.Tensor,
    ref_mse_chosen: torch.Tensor,
    ref_mse_rejected: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected images.

    ``logits = -0.5 * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))`` is the implicit log-ratio
    difference; as in TRL's DPO, sigmoid is ``-logsigmoid(beta * logits)``, hinge
    ``relu(1 - beta * logits)``, IPO ``(logits - 1 / (2 * beta))**2`` (there ``beta`` is IPO's tau), and
    APO-zero (D'Oosterlinck et al., 2024) ``1 - sigmoid(chosen_reward) + sigmoid(rejected_reward)``: it scores
    each image against the reference on its own, so the chosen images' error must fall in absolute terms, not
    only relative to the rejected ones'.
    The rewards are ``-0.5 * beta * (mse - ref_mse)``, so ``chosen - rejected == beta * logits``.
    """
    chosen_rewards = -0.5 * beta * (policy_mse_chosen - ref_mse_chosen)
    rejected_rewards = -0.5 * beta * (policy_mse_rejected - ref_mse_rejected)
    logits = -0.5 * ((policy_mse_chosen - ref_mse_chosen) - (policy_mse_rejected - ref_mse_rejected))
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """1 where the chosen image's implicit reward is strictly higher, else 0 (ties count 0, as in TRL)."""
    return (chosen_rewards > rejected_rewards).float()
