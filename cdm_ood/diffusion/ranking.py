"""Ranking restoration candidates: by their expected error under the posterior, or by plausibility (exact
log-densities from one forward pass per candidate, Theorem 3.2), alone or with the likelihood of the observation.

Criteria, higher = better:
- `auto` (the default): `expected-mse` for noise, where E[x | y] is exact in one gradient evaluation (Tweedie),
  and `candidate-posterior` under an operator (blur, downsampling, masking), where E[x | y] would come from
  posterior samples (`resolve_criterion`).
- `expected-mse`: minus the posterior expected squared error of candidate c, E[||c - x||^2 | y] / d =
  ||c - E[x | y]||^2 / d + tr Cov[x | y] / d: the Bayes estimate of the candidate's MSE (so of its PSNR order);
  the trace is the same for every candidate, so the score is -||c - E[x | y]||^2 / d. E[x | y] and posterior
  samples come from `posterior` (Tweedie for noise: one gradient evaluation per observation, not per candidate).
- `candidate-posterior`: minus the expected squared error of c under the posterior restricted to the candidates,
  sum_j w_j ||c - c_j||^2 / d with w_j = p(c_j | y) / sum_k p(c_k | y) from the `map` scores (Bayes' rule on
  the candidate set: the Bayes risk when the truth is one of them). In high dimension the weights concentrate on
  the most probable candidate, so candidates are in effect ordered by their distance to it. One forward pass per
  candidate, no posterior samples.
- `prior`: log p_0(x). Favours over-smoothed candidates: a blurred image is often *more* likely than a
  sharp one under an image prior, so rank against the observation when there is one.
- `map`: log p_0(x) + log p(y | x), with y = A(x) + sigma n, n ~ N(0, I):
  log p(y | x) = -||y - A(x)||^2 / (2 sigma^2) - (m / 2) log(2 pi sigma^2); A is the identity (denoising) or
  any linear operator (blur, downsampling, masking). Up to a constant in x this is log p(x | y).
  `map` and `candidate-posterior` take a `prior_weight` beta: beta log p_0(x) + log p(y | x), the posterior with
  the prior raised to the power beta (a tempered prior). beta = 1 is Bayes' rule; beta < 1 trusts the trained
  model's density less than the exact Gaussian likelihood of the observation. The default, `PRIOR_WEIGHT`, is the
  best worst case on development images of three CPU-scale models (`benchmarks/prior_weight.py`).
- `noisy-level`: for candidates that are themselves noisy with std sigma, x = x0 + sigma n: the density of x is
  alpha_t^d p_t(alpha_t x) at the level t with sigma_t / alpha_t = sigma (one forward pass on alpha_t x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import UsageError
from .denoiser import Classifier
from .likelihood import log_likelihood_profile_batched
from .posterior import Operator, posterior_mean, posterior_samples
from .sampling import matching_level
from .schedules import NoiseSchedule

CRITERIA = ("auto", "expected-mse", "candidate-posterior", "prior", "map", "noisy-level")
DEFAULT_CRITERION = "auto"
PRIOR_WEIGHT = 0.5  # beta of `map` and `candidate-posterior` (benchmarks/prior_weight.py chooses it)
TEMPERED = ("map", "candidate-posterior")  # the criteria that weigh log p_0 by the prior weight
OPERATOR_SAMPLES = 8  # posterior samples for E[x | y] under a degradation operator (no closed form there)


def check_prior_weight(beta: float) -> float:
    """beta itself; ValueError unless it is a finite number >= 0."""
    if not (math.isfinite(beta) and beta >= 0):
        raise UsageError(f"the prior weight must be a finite number >= 0, got {beta}")
    return beta


def resolve_criterion(criterion: str, operator: Optional[Operator]) -> str:
    """The criterion `auto` stands for: `expected-mse` for noise (`operator` None), else `candidate-posterior`."""
    if criterion != "auto":
        return criterion
    return "expected-mse" if operator is None else "candidate-posterior"


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


def candidate_posterior_risk(candidates: Tensor, log_posterior: Tensor) -> tuple[Tensor, Tensor]:
    """Expected MSE of each candidate (B,) under the posterior restricted to the candidates, and its weights:
    w = softmax(log p(c_j | y) + const), risk_i = sum_j w_j ||c_i - c_j||^2 / d (Bayes' rule on the set)."""
    weights = torch.softmax(log_posterior.double(), 0)
    flat = candidates.flatten(1).double()
    distances = (flat[:, None] - flat[None]).square().mean(2)  # (B, B) ||c_i - c_j||^2 / d, exact
    return distances @ weights, weights


def expected_quality(candidates: Tensor, samples: Tensor, weights: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per candidate (B,), averaged over posterior samples x_k (uniformly, or with `weights` summing to 1):
    expected MSE, PSNR and SSIM (data range 2, images in [-1, 1]). The expected MSE is
    ||c - mean_k x_k||^2 / d + the samples' spread, i.e. the Bayes risk."""
    from monai.metrics import SSIMMetric

    pairs = candidates[:, None].expand(-1, len(samples), *candidates.shape[1:])
    draws = samples[None].expand_as(pairs)
    mse = (pairs.double() - draws.double()).flatten(2).square().mean(2)  # (B, K)
    window = min(7, *candidates.shape[2:])
    ssim = SSIMMetric(spatial_dims=candidates.ndim - 2, data_range=2.0, reduction="none",
                      win_size=window - (window % 2 == 0))  # fmt: skip
    s = ssim(pairs.flatten(0, 1).float(), draws.flatten(0, 1).float()).reshape(mse.shape).double()
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
    w = torch.full((len(samples),), 1 / len(samples), dtype=torch.float64) if weights is None else weights.double()
    return {"expected_mse": mse @ w, "expected_psnr": psnr @ w, "expected_ssim": s @ w}


@dataclass
class Ranking:
    """Candidates ordered best first: `order[0]` is the index of the best one."""

    order: list[int]
    scores: Tensor  # (B,) the criterion, per candidate in input order
    log_prior: Optional[Tensor] = None  # (B,) log p_0(x) in nats, for `prior` and `map`
    log_observation: Optional[Tensor] = None  # (B,) log p(y | x), for `map`
    posterior_mean: Optional[Tensor] = None  # (1, C, *spatial) E[x | y], for `expected-mse`
    quality: Optional[dict[str, Tensor]] = None  # `expected_quality`: expected-mse with samples, candidate-posterior
    weights: Optional[Tensor] = None  # (B,) p(c | y) normalised over the candidates, for `candidate-posterior`
    samples: Optional[Tensor] = None  # (K, C, *spatial) the posterior samples behind `quality`


def rank_restorations(
    classifier: Classifier,
    schedule: NoiseSchedule,
    candidates: Tensor,
    observed: Optional[Tensor] = None,
    criterion: str = DEFAULT_CRITERION,
    sigma: Optional[float] = None,
    operator: Optional[Operator] = None,
    batch_size: int = 64,
    *,
    samples: int = 0,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
    prior_weight: float = PRIOR_WEIGHT,
) -> Ranking:
    """Rank model-space candidates (B, C, *spatial) of one observation y, shaped like A(candidate) with or without
    its batch axis of 1.

    `auto` (`resolve_criterion`), `expected-mse`, `candidate-posterior` and `map` need `observed` and `sigma`;
    `noisy-level` needs `sigma` (the candidates' own noise std); `prior` needs neither. sigma is in model units
    (data scaled to [-1, 1]). `expected-mse` draws `samples` posterior samples (`steps` sampler steps each) for
    the expected PSNR / SSIM; under an `operator` it always draws them (at least `OPERATOR_SAMPLES`), since
    E[x | y] is their mean. `prior_weight` beta weighs log p_0 in `map` and `candidate-posterior` (a tempered
    prior; 1 is Bayes' rule).
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    criterion = resolve_criterion(criterion, operator)
    if criterion != "prior" and (sigma is None or sigma <= 0):
        raise UsageError(f"criterion {criterion!r} needs a positive noise std sigma")
    check_prior_weight(prior_weight)
    if criterion in ("map", "expected-mse", "candidate-posterior") and observed is None:
        raise UsageError(f"criterion {criterion!r} needs the observed (degraded) image")
    y = None
    if observed is not None:
        one = candidates[:1] if operator is None else operator(candidates[:1])
        y = observed if observed.ndim == one.ndim else observed[None]
    if criterion == "expected-mse":
        return _expected_mse_ranking(classifier, schedule, candidates, y, sigma, operator, samples, steps, generator)
    log_prior = log_obs = None
    if criterion == "noisy-level":
        scores = noisy_level_log_density(classifier, schedule, candidates, sigma, batch_size)
    else:
        scores = log_prior = log_likelihood_profile_batched(classifier, candidates, schedule, batch_size)[:, 0].double()
    if criterion in TEMPERED:
        log_obs = log_observation_likelihood(candidates, y, sigma, operator)
        scores = prior_weight * log_prior + log_obs
    if criterion == "candidate-posterior":
        risk, weights = candidate_posterior_risk(candidates, scores)
        quality = expected_quality(candidates, candidates, weights)
        return Ranking(_order(-risk), -risk, log_prior, log_obs, quality=quality, weights=weights)
    return Ranking(_order(scores), scores, log_prior, log_obs)


def _order(scores: Tensor) -> list[int]:
    return torch.argsort(scores, descending=True, stable=True).tolist()


def _expected_mse_ranking(
    classifier: Classifier, schedule: NoiseSchedule, candidates: Tensor, y: Tensor, sigma: float,
    operator: Optional[Operator], samples: int, steps: int, generator: Optional[torch.Generator],
) -> Ranking:  # fmt: skip
    """`expected-mse`: scores -||c - E[x | y]||^2 / d, with `expected_quality` when posterior samples are drawn."""
    n = max(samples, OPERATOR_SAMPLES) if operator is not None else samples
    draws = None
    if n:
        draws = posterior_samples(classifier, schedule, y.to(candidates), sigma, n, operator,
                                  tuple(candidates.shape[1:]), steps, generator)  # fmt: skip
    mean = posterior_mean(classifier, schedule, y.to(candidates), sigma, operator, draws)
    scores = -(candidates - mean).flatten(1).double().square().mean(1)
    quality = None if draws is None else expected_quality(candidates, draws)
    return Ranking(_order(scores), scores, posterior_mean=mean, quality=quality, samples=draws)
