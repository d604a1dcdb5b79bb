"""Sampling with the CDM gradient denoiser (Theorem 3.1): DDPM (any stride), DDIM and DPM-Solver-2.

Every sampler shares one loop: the denoiser adapter turns the classifier into eps_hat(x, t) (one forward and one
backward pass, classifier-free guidance folded in), and a pure step rule maps (x_t, eps_hat) to x_s for the next,
lower noise level s. Step rules never call the network. The last step returns x0_hat clipped to [-1, 1].

MONAI's `DDPMScheduler` / `DDIMScheduler` hold the same algebra for epsilon networks, but their `step()` works on
the schedule's own integer grid with its own `alpha_bar` (no t = 0 / T+1 classes) and, for DDPM, only single
steps (`t -> t-1`); the strided DDPM pair update and DPM-Solver in lambda are not there. So the rules are written
out below, each against its equation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from ..errors import UsageError
from .denoiser import Classifier, predict_noise, predict_x0
from .schedules import NoiseSchedule

METHODS = ("ddpm", "ddim", "dpm2")
Denoiser = Callable[[Tensor, int], Tensor]


def guided_denoiser(
    classifier: Classifier,
    schedule: NoiseSchedule,
    labels: Optional[Tensor] = None,
    guidance: float = 0.0,
    null_label: Optional[int] = None,
) -> Denoiser:
    """eps_hat(x, t) from the classifier's gradient; with `guidance` w > 0, classifier-free guidance
    eps_w = (1 + w) eps(x, t | c) - w eps(x, t | null), both terms from one batched pass."""
    if guidance == 0.0 or labels is None:
        return lambda x, t: predict_noise(classifier, x, t, schedule, labels=labels)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the model's null label")

    def eps(x: Tensor, t: int) -> Tensor:
        both = predict_noise(
            classifier, torch.cat([x, x]), t, schedule, labels=torch.cat([labels, torch.full_like(labels, null_label)])
        )
        conditional, unconditional = both.chunk(2)
        return (1 + guidance) * conditional - guidance * unconditional

    return eps


def strided_levels(top: int, steps: int) -> list[int]:
    """`steps` distinct noise levels from `top` down to 1, evenly strided: top - i (top - 1) / (steps - 1) rounded
    half up, in integers (floats round 25.5 either way); every level when steps == top."""
    if not 1 <= steps <= top:
        raise UsageError(f"steps must be in 1..{top}, got {steps}")
    if steps == 1:
        return [top]
    gaps = steps - 1
    return [(2 * top * gaps - 2 * (top - 1) * i + gaps) // (2 * gaps) for i in range(steps)]


def _scalars(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as Python floats."""
    return float(schedule.sqrt_alpha_bar[t]), float(schedule.sigma[t])


def ddpm_step(x: Tensor, eps: Tensor, t: int, s: int, schedule: NoiseSchedule, z: Tensor) -> Tensor:
    """Ancestral step t -> s < t for any stride, with the pair's own beta_{t|s} = 1 - alpha_bar_t / alpha_bar_s:
    x_s = (x_t - beta_{t|s} / sigma_t * eps) / sqrt(1 - beta_{t|s}) + sqrt(beta~) z,
    beta~ = beta_{t|s} (1 - alpha_bar_s) / (1 - alpha_bar_t) (the posterior variance of q(x_s | x_t, x0))."""
    abar_t, abar_s = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[s])
    beta = 1.0 - abar_t / abar_s
    mean = (x - beta / math.sqrt(1.0 - abar_t) * eps) / math.sqrt(1.0 - beta)
    return mean + math.sqrt(beta * (1.0 - abar_s) / (1.0 - abar_t)) * z


def ddim_step(
    x: Tensor, eps: Tensor, t: int, s: int, schedule: NoiseSchedule, z: Optional[Tensor], eta: float = 0.0
) -> Tensor:
    """DDIM (Song et al. eq. 12): x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - c^2) eps + c z,
    c = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s); eta = 0 is deterministic."""
    abar_t, abar_s = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[s])
    x0 = predict_x0(eps, x, t, schedule)
    c = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
    out = math.sqrt(abar_s) * x0 + math.sqrt(1.0 - abar_s - c * c) * eps
    return out + c * z if c > 0 and z is not None else out


def dpm2_step(
    x: Tensor, eps: Tensor, t: int, s: int, schedule: NoiseSchedule, eps_prev: Optional[Tensor], t_prev: Optional[int]
) -> Tensor:
    """DPM-Solver-2 multistep in lambda = log(alpha / sigma), h = lambda_s - lambda_t:
    x_s = (alpha_s / alpha_t) x - sigma_s (e^h - 1) eps_t - sigma_s (e^h - h - 1) D1,
    D1 = (eps_t - eps_prev) / (lambda_t - lambda_prev) the slope of eps_hat in lambda; the first step (no
    previous eps) is the first-order rule, i.e. DDIM."""
    (a_t, s_t), (a_s, s_s) = _scalars(schedule, t), _scalars(schedule, s)
    lam_t, lam_s = math.log(a_t / s_t), math.log(a_s / s_s)
    h = lam_s - lam_t
    out = (a_s / a_t) * x - s_s * math.expm1(h) * eps
    if eps_prev is None:
        return out
    a_p, s_p = _scalars(schedule, t_prev)
    slope = (eps - eps_prev) / (lam_t - math.log(a_p / s_p))
    return out - s_s * (math.expm1(h) - h) * slope


@torch.no_grad()
def sample(
    classifier: Classifier,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    method: str = "ddim",
    steps: int = 50,
    labels: Optional[Tensor] = None,
    guidance: float = 0.0,
    generator: Optional[torch.Generator] = None,
    *,
    eta: float = 0.0,
    null_label: Optional[int] = None,
    x_start: Optional[Tensor] = None,
    t_start: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    callback: Optional[Callable[[int, int, Tensor], None]] = None,
    denoiser: Optional[Denoiser] = None,
) -> Tensor:
    """Draw samples of `shape` (B, C, *spatial) by running the reverse process from pure noise at t = T.

    Args:
        classifier: any callable returning (B, T+2) logits (a `CDMClassifier`, an exact oracle, ...).
        method: "ddpm" (ancestral), "ddim" (eta = 0 by default) or "dpm2" (DPM-Solver-2 multistep).
        steps: number of noise levels visited (network evaluations), evenly strided from T (or `t_start`) to 1.
        labels, guidance, null_label: class-conditional sampling with classifier-free guidance w = `guidance`.
        generator: makes the draws reproducible.
        x_start, t_start: start from a given x at noise level t_start (posterior sampling of a noisy image)
            instead of N(0, I) at T.
        callback: called as callback(i, t, x) after each step.
        denoiser: eps_hat(x, t) to use instead of the classifier's own (e.g. `observation_guided_denoiser`).

    Each step costs one forward and one backward pass; no graph is kept between steps.
    """
    if method not in METHODS:
        raise UsageError(f"unknown sampler {method!r}; expected one of {METHODS}")
    levels = strided_levels(schedule.T if t_start is None else t_start, steps)
    eps_fn = denoiser or guided_denoiser(classifier, schedule, labels, guidance, null_label)
    x = (
        torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        if x_start is None
        else x_start.to(dtype)
    )
    eps_prev, t_prev = None, None
    for i, t in enumerate(levels):
        eps = eps_fn(x, t)
        if i == len(levels) - 1:
            x = predict_x0(eps, x, t, schedule).clamp(-1.0, 1.0)
        else:
            s = levels[i + 1]
            stochastic = method == "ddpm" or (method == "ddim" and eta > 0)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if stochastic else None
            if method == "ddpm":
                x = ddpm_step(x, eps, t, s, schedule, z)
            elif method == "ddim":
                x = ddim_step(x, eps, t, s, schedule, z, eta)
            else:
                x = dpm2_step(x, eps, t, s, schedule, eps_prev, t_prev)
            eps_prev, t_prev = eps, t
        if callback is not None:
            callback(i, t, x)
    return x


def denoise(
    classifier: Classifier,
    x_noisy: Tensor,
    schedule: NoiseSchedule,
    sigma: float,
    *,
    labels: Optional[Tensor] = None,
    method: Optional[str] = None,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Clean estimate of `x_noisy` = x0 + sigma * noise (data scaled to [-1, 1]).

    The noisy image is mapped onto the diffusion path: with t the level whose sigma_t / alpha_t is closest to
    `sigma`, x_t = alpha_t * x_noisy. Without `method`, returns the one-step MMSE estimate x0_hat (Theorem 3.1,
    not clipped); with a sampler name, runs the reverse process from t (`ddpm` draws posterior samples).
    """
    t = matching_level(schedule, sigma)
    x_t = schedule.sqrt_alpha_bar[t].to(x_noisy) * x_noisy
    if method is None:
        return predict_x0(predict_noise(classifier, x_t, t, schedule, labels=labels), x_t, t, schedule)
    return sample(
        classifier, schedule, x_t.shape, method, min(steps, t), labels, generator=generator,
        x_start=x_t, t_start=t, dtype=x_t.dtype, device=x_t.device,
    )  # fmt: skip


def matching_level(schedule: NoiseSchedule, sigma: float) -> int:
    """The level t in 1..T whose noise-to-signal ratio sigma_t / alpha_t is closest to `sigma` (in log)."""
    if sigma <= 0:
        raise UsageError(f"sigma must be positive, got {sigma}")
    ratio = schedule.sigma[1:-1] / schedule.sqrt_alpha_bar[1:-1]
    return int((ratio.log() - math.log(sigma)).abs().argmin()) + 1
