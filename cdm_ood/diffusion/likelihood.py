"""Theorem 3.2: exact log-likelihood of clean and noisy data from one forward pass of the classifier."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .denoiser import Classifier, call_classifier
from .schedules import NoiseSchedule, timesteps


def log_standard_normal(x: Tensor) -> Tensor:
    """log N(x; 0, I) = -(d/2) log(2 pi) - ||x||^2 / 2 per sample, the density of the t = T+1 class."""
    flat = x.flatten(1)
    return -0.5 * flat.shape[1] * math.log(2 * math.pi) - 0.5 * flat.square().sum(dim=1)


def log_likelihood_profile(
    classifier: Classifier, x: Tensor, schedule: NoiseSchedule, labels: Optional[Tensor] = None
) -> Tensor:
    """Theorem 3.2 (eq. 10) for every t at once: log p_t(x) = F_t(x) - F_{T+1}(x) + log N(x; 0, I).

    With the uniform prior over t the log(P(T+1)/P(t)) term is 0. Returns (B, T+2) nats from one forward
    pass without gradient; column 0 is the density of clean data, column T+1 is log N(x; 0, I) itself.
    """
    with torch.no_grad():
        logits = call_classifier(classifier, x, schedule, labels)
        return logits - logits[:, -1:] + log_standard_normal(x)[:, None]


def log_likelihood_profile_batched(
    classifier: Classifier, x: Tensor, schedule: NoiseSchedule, batch_size: int = 64, device: Optional[str] = None
) -> Tensor:
    """`log_likelihood_profile` of any number of images, `batch_size` per forward pass (each moved to `device`
    when given); (B, T+2) nats on the device of `x`."""
    return torch.cat([
        log_likelihood_profile(classifier, chunk if device is None else chunk.to(device), schedule).to(x.device)
        for chunk in x.split(batch_size)
    ])  # fmt: skip


def log_likelihood(
    classifier: Classifier,
    x: Tensor,
    schedule: NoiseSchedule,
    t: int | Tensor = 0,
    labels: Optional[Tensor] = None,
) -> Tensor:
    """Theorem 3.2 (eq. 10): log p_t(x) in nats, shape (B,); t = 0 (the default) is the clean-data density."""
    profile = log_likelihood_profile(classifier, x, schedule, labels)
    return profile.gather(1, timesteps(t, x)[:, None]).squeeze(1)


def bits_per_dim(ll: Tensor, num_dims: int, bit_depth: int = 8) -> Tensor:
    """bpd = -ll / (d ln 2) + log2(2^bit_depth / 2).

    The offset converts a density on [-1, 1] to a probability of one of 2^bit_depth quantisation bins of
    width 2 / 2^bit_depth: +7 bits for 8-bit data (128 levels per unit length).
    """
    return -ll / (num_dims * math.log(2)) + (bit_depth - 1)
