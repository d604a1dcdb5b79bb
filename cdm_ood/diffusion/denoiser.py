"""Theorem 3.1: the noise-level classifier's input-gradient is the MMSE denoiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .schedules import NoiseSchedule, at, timesteps

Classifier = Callable[..., Tensor]
"""Any callable `classifier(x)` or `classifier(x, labels)` returning (B, T+2) logits F(x)."""


def call_classifier(classifier: Classifier, x: Tensor, schedule: NoiseSchedule, labels: Optional[Tensor]) -> Tensor:
    """F(x) (or F(x | labels)), checked to have one logit per noise level t = 0..T+1."""
    logits = classifier(x) if labels is None else classifier(x, labels)
    if logits.ndim != 2 or logits.shape != (x.shape[0], schedule.num_classes):
        raise ValueError(
            f"classifier returned logits of shape {tuple(logits.shape)}; expected "
            f"({x.shape[0]}, T+2={schedule.num_classes}) for this noise schedule"
        )
    return logits


def logits_and_noise(
    classifier: Classifier,
    x: Tensor,
    t: int | Tensor,
    schedule: NoiseSchedule,
    labels: Optional[Tensor] = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """F(x) and eps_hat(x, t) = sigma_t (x + grad_x [F_{T+1}(x) - F_t(x)]) from one forward and one backward pass.

    The gradient of sum_i [F_{T+1}(x_i) - F_{t_i}(x_i)] w.r.t. the batch is per-sample exact when the network
    mixes nothing across the batch. With `create_graph` the result is differentiable w.r.t. the classifier's
    parameters (Algorithm 1); otherwise eps_hat is detached. The logits keep their graph either way, so a
    caller can still backpropagate a loss on them (the CE-only ablation); callers that drop them free it.
    """
    t = timesteps(t, x)
    with torch.enable_grad():
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        logits = call_classifier(classifier, x_in, schedule, labels)
        gap = logits[:, -1] - logits.gather(1, t[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(gap.sum(), x_in, create_graph=create_graph, retain_graph=True)
        eps_hat = at(schedule.sigma, t, x) * (x_in + grad)
    return logits, eps_hat if create_graph else eps_hat.detach()


def predict_noise(
    classifier: Classifier,
    x: Tensor,
    t: int | Tensor,
    schedule: NoiseSchedule,
    labels: Optional[Tensor] = None,
    create_graph: bool = False,
) -> Tensor:
    """Theorem 3.1 (eq. 8): E[eps | x_t = x] = sigma_t (x + grad_x [F_{T+1}(x) - F_t(x)]).

    `t` is an int or a (B,) tensor of noise levels. Exactly 0 at t = 0 (sigma_0 = 0) and x at t = T+1
    (the gradient term vanishes).
    """
    return logits_and_noise(classifier, x, t, schedule, labels, create_graph)[1]


def predict_x0(eps_hat: Tensor, x: Tensor, t: int | Tensor, schedule: NoiseSchedule) -> Tensor:
    """x0_hat = (x_t - sigma_t eps_hat) / sqrt(alpha_bar_t), the MMSE estimate of the clean signal (t <= T)."""
    t = timesteps(t, x)
    return (x - at(schedule.sigma, t, x) * eps_hat) / at(schedule.sqrt_alpha_bar, t, x)
