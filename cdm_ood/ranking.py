"""Ranking restoration candidates by plausibility: exact log-densities from one forward pass per candidate
(Theorem 3.2), alone or combined with the likelihood of the observation (the posterior, i.e. MAP ranking).

Criteria, higher = more plausible:
- `prior`: log p_0(x). Favours over-smoothed candidates: a blurred image is often *more* likely than a
  sharp one under an image prior, so rank against the observation when there is one.
- `map`: log p_0(x) + log p(y | x), with y = A(x) + sigma n, n ~ N(0, I):
  log p(y | x) = -||y - A(x)||^2 / (2 sigma^2) - (m / 2) log(2 pi sigma^2); A is the identity (denoising) or
  any linear operator (blur, downsampling, masking). Up to a constant in x this is log p(x | y).
- `noisy-level`: for candidates that are themselves noisy with std sigma, x = x0 + sigma n: the density of x is
  alpha_t^d p_t(alpha_t x) at the level t with sigma_t / alpha_t = sigma (one forward pass on alpha_t x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .denoiser import Classifier
from .errors import UsageError
from .likelihood import log_likelihood_profile_batched
from .sampling import matching_level
from .schedules import NoiseSchedule

CRITERIA = ("prior", "map", "noisy-level")
Operator = Callable[[Tensor], Tensor]


def log_observation_likelihood(
    candidates: Tensor, observed: Tensor, sigma: float, operator: Optional[Operator] = None
) -> Tensor:
    """log N(y; A(x), sigma^2 I) per candidate x, shape (B,); `observed` y is one image broadcast to all."""
    predicted = candidates if operator is None else operator(candidates)
    residual = (observed.expand_as(predicted) - predicted).flatten(1).double()
    m = residual.shape[1]
    return -residual.square().sum(1) / (2 * sigma**2) - 0.5 * m * math.log(2 * math.pi * sigma**2)


def noisy_level_log_density(
    classifier: Classifier, schedule: NoiseSchedule, x: Tensor, sigma: float, batch_size: int = 64
) -> Tensor:
    """log density of x = x0 + sigma n: log p_t(alpha_t x) + d log alpha_t, t matching sigma (eq. 10 at t)."""
    t = matching_level(schedule, sigma)
    alpha = float(schedule.sqrt_alpha_bar[t])
    profile = log_likelihood_profile_batched(classifier, alpha * x, schedule, batch_size).double()
    return profile[:, t] + x[0].numel() * math.log(alpha)


@dataclass
class Ranking:
    """Candidates ordered best first: `order[0]` is the index of the most plausible one."""

    order: list[int]
    scores: Tensor  # (B,) the criterion, per candidate in input order
    log_prior: Optional[Tensor]  # (B,) log p_0(x) in nats, for `prior` and `map`
    log_observation: Optional[Tensor]  # (B,) log p(y | x), for `map`


def rank_restorations(
    classifier: Classifier,
    schedule: NoiseSchedule,
    candidates: Tensor,
    observed: Optional[Tensor] = None,
    criterion: str = "map",
    sigma: Optional[float] = None,
    operator: Optional[Operator] = None,
    batch_size: int = 64,
) -> Ranking:
    """Rank model-space candidates (B, C, *spatial) of one observation (C, *spatial) or (1, C, *spatial).

    `map` needs `observed` and `sigma`; `noisy-level` needs `sigma` (the candidates' own noise std); `prior`
    needs neither. sigma is in model units (data scaled to [-1, 1]).
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if criterion in ("map", "noisy-level") and (sigma is None or sigma <= 0):
        raise ValueError(f"criterion {criterion!r} needs a positive noise std sigma")
    if criterion == "map" and observed is None:
        raise ValueError("criterion 'map' needs the observed (degraded) image")
    log_prior = log_obs = None
    if criterion == "noisy-level":
        scores = noisy_level_log_density(classifier, schedule, candidates, sigma, batch_size)
    else:
        scores = log_prior = log_likelihood_profile_batched(classifier, candidates, schedule, batch_size)[:, 0].double()
    if criterion == "map":
        y = observed if observed.ndim == candidates.ndim else observed[None]
        log_obs = log_observation_likelihood(candidates, y, sigma, operator)
        scores = log_prior + log_obs
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return Ranking(order, scores, log_prior, log_obs)
