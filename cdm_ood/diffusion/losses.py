"""Algorithm 1: the CDM training loss, cross-entropy on the logits plus MSE on the gradient denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoiser import Classifier, logits_and_noise
from .schedules import NoiseSchedule, diffuse, timesteps


@dataclass
class CDMLoss:
    """The terms of one Algorithm 1 step: `loss` = mse_weight * mse + ce_weight * ce."""

    loss: Tensor
    mse: Tensor
    ce: Tensor
    accuracy: Tensor


def cdm_loss(
    classifier: Classifier,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    ce_weight: float = 1e-3,
    mse_weight: float = 1.0,
    t: Optional[int | Tensor] = None,
    noise: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> CDMLoss:
    """Algorithm 1: t ~ U{0..T+1}, eps ~ N(0, I), x_t = sqrt(alpha_bar_t) x0 + sigma_t eps, then
    loss = mse_weight * mean((eps_hat(x_t, t) - eps)^2) + ce_weight * CE(F(x_t), t).

    The MSE is averaged over all elements and the CE over the batch (lambda_CE = 1e-3 in the reference).
    Giving `t` and `noise` makes the loss deterministic. With `mse_weight=0` (the CE-only ablation) the
    MSE is still reported, but no second-order graph is built.
    """
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_classes, (batch,), device=x0.device, generator=generator)
    t = timesteps(t, x0)
    if noise is None:
        noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    x_t = diffuse(x0, t, noise, schedule)
    logits, eps_hat = logits_and_noise(classifier, x_t, t, schedule, labels, create_graph=mse_weight != 0)
    mse = (eps_hat - noise).square().mean()
    ce = F.cross_entropy(logits, t)
    accuracy = (logits.detach().argmax(dim=1) == t).to(x0.dtype).mean()
    return CDMLoss(loss=mse_weight * mse + ce_weight * ce, mse=mse, ce=ce, accuracy=accuracy)
