"""The posterior p(x | y) of an observation y = A(x) + sigma n, n ~ N(0, I), under the CDM prior.

- Denoising (A the identity): E[x | y] is Tweedie's estimate at the level t with sigma_t / alpha_t = sigma
  (Theorem 3.1, one forward and one backward pass); posterior samples run the reverse process from that level.
- Any linear A (blur, downsampling, masking): posterior samples from the reverse process guided by the
  Gaussian likelihood of the observation given x_t,
      p(y | x_t) ~= N(y; A x0_hat(x_t), sigma^2 I + v_t A A^T),
  x0_hat the gradient denoiser and v_t the posterior variance of x0 given x_t from Tweedie's second-order
  identity Cov[x0 | x_t] = (sigma_t^2 / alpha_t) d x0_hat / d x_t, here taken isotropic and estimated with one
  Hutchinson probe. The guidance moves x0_hat along Cov[x0 | x_t] A^T (sigma^2 I + v_t A A^T)^{-1} (y - A x0_hat)
  with the full covariance (PiGDM's direction), by the exact Gaussian step along that line. For an isotropic
  Gaussian prior N(mu, s^2 I) all of it is exact, so the guided score is the exact score of p(x_t | y). E[x | y]
  is then the mean of the samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .denoiser import Classifier, predict_noise, predict_x0
from .sampling import Denoiser, denoise, sample
from .schedules import NoiseSchedule

Operator = Callable[[Tensor], Tensor]
CG_ITERATIONS = 50


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products <a_i, b_i>: (B,) broadcast back to a's rank."""
    return (a * b).flatten(1).sum(1).reshape(-1, *[1] * (a.ndim - 1))


def adjoint(operator: Operator, u: Tensor, like: Tensor) -> Tensor:
    """A^T u for a linear operator A on images shaped like `like` (the vector-Jacobian product at 0)."""
    with torch.enable_grad():
        x = torch.zeros_like(like, requires_grad=True)
        return torch.autograd.grad(operator(x), x, u)[0]


def conjugate_gradient(apply: Callable[[Tensor], Tensor], r: Tensor, rtol: float = 1e-10) -> Tensor:
    """u with apply(u) = r per sample, for a symmetric positive definite `apply` (conjugate gradients)."""
    u, res = torch.zeros_like(r), r.clone()
    p, rs = res.clone(), _dot(res, res)
    stop = rtol**2 * rs
    for _ in range(CG_ITERATIONS):
        if bool((rs <= stop).all()):
            break
        mp = apply(p)
        step = rs / _dot(p, mp).clamp_min(torch.finfo(r.dtype).tiny)
        u, res = u + step * p, res - step * mp
        rs_new = _dot(res, res)
        p, rs = res + rs_new / rs.clamp_min(torch.finfo(r.dtype).tiny) * p, rs_new
    return u


def step_along(direction: Tensor, a_direction: Tensor, residual: Tensor, weighted: Tensor, sigma: float) -> Tensor:
    """lambda d, the most probable point x0_hat + lambda d of the Gaussian posterior of x0 on the line along d.

    With d = C A^T w (`weighted` = A^T w, C the covariance of x0), log N(y; A(x0_hat + lambda d), sigma^2 I)
    - lambda^2 d^T C^{-1} d / 2 is largest at lambda = <A d, r> / (||A d||^2 + sigma^2 <d, A^T w>), r = y - A x0_hat;
    lambda = 1 when w = (sigma^2 I + A C A^T)^{-1} r (the exact update). Kept in [0, 1]: never past the direction's
    own step, never backwards (a learned C need not be positive, so <d, A^T w> counts from 0).
    """
    d, ad, r, atw = (v.flatten(1) for v in (direction, a_direction, residual, weighted))  # A y need not be an image
    curvature = (ad * ad).sum(1) + sigma**2 * (d * atw).sum(1).clamp_min(0.0)
    ratio = (ad * r).sum(1) / curvature.clamp_min(torch.finfo(d.dtype).tiny)
    return ratio.clamp(0.0, 1.0).reshape(-1, *[1] * (direction.ndim - 1)) * direction


def observation_guided_denoiser(
    classifier: Classifier,
    schedule: NoiseSchedule,
    observed: Tensor,
    sigma: float,
    operator: Optional[Operator] = None,
    generator: Optional[torch.Generator] = None,
) -> Denoiser:
    """eps_hat of p(x_t | y): eps_hat(x_t) - (alpha_t / sigma_t) Delta, Delta the Gaussian-likelihood update of x0_hat.

    Tweedie's second-order identity gives Cov[x0 | x_t] = C = (sigma_t^2 / alpha_t) J, J = d x0_hat / d x_t
    (symmetric: the denoiser is a gradient, Theorem 3.1). The update is Delta = lambda C A^T M^{-1} (y - A x0_hat)
    (PiGDM), M = sigma^2 I + v_t A A^T with C taken isotropic, v_t = (sigma_t^2 / alpha_t) <z, J z> / <z, z> for
    one Rademacher z per image over the batch (one level, one variance), kept in [0, sigma_t^2 / alpha_t^2] (x0 | x_t
    is never wider than the noise); lambda is `step_along`'s. M's isotropic C overstates the step along directions
    the prior correlates (on missing pixels of a CPU-trained MNIST model the full step made a worse posterior mean
    than C isotropic on both sides), which lambda undoes. ||Delta|| <= (sigma_t / alpha_t)^2 ||A^T M^{-1} r||, as
    C <= (sigma_t / alpha_t)^2 I. Cost per call: one forward pass, one backward pass kept for differentiation and
    two vector-Jacobian products through it. `observed` is one observation (broadcast to every sample) or one per
    sample.
    """
    a = operator or (lambda x: x)

    def eps(x: Tensor, t: int) -> Tensor:
        alpha, sigma_t = float(schedule.sqrt_alpha_bar[t]), float(schedule.sigma[t])
        widest = (sigma_t / alpha) ** 2
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps_hat = predict_noise(classifier, x_in, t, schedule, create_graph=True)
            x0 = predict_x0(eps_hat, x_in, t, schedule)
            z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (jz,) = torch.autograd.grad(x0, x_in, z, retain_graph=True)
            v = (sigma_t**2 / alpha * (z * jz).sum() / z.square().sum()).clamp(0.0, widest)
            x0_hat = x0.detach()
            predicted = a(x0_hat)
            residual = (observed.expand_as(predicted) if observed.shape[0] == 1 else observed) - predicted
            w = conjugate_gradient(lambda u: sigma**2 * u + v * a(adjoint(a, u, x0_hat)), residual)
            weighted = adjoint(a, w, x0_hat)
            (jw,) = torch.autograd.grad(x0, x_in, weighted)
        direction = sigma_t**2 / alpha * jw
        update = step_along(direction, a(direction), residual, weighted, sigma)
        bound = (
            widest
            * weighted.flatten(1).norm(dim=1)
            / update.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        )
        update = update * bound.clamp(max=1.0).reshape(-1, *[1] * (x.ndim - 1))
        return eps_hat.detach() - alpha / sigma_t * update

    return eps


def posterior_samples(
    classifier: Classifier,
    schedule: NoiseSchedule,
    observed: Tensor,
    sigma: float,
    n: int,
    operator: Optional[Operator] = None,
    shape: Optional[tuple[int, ...]] = None,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """`n` samples (n, C, *spatial) of x | y for one observation `observed` (1, ...).

    Identity: DDPM from the level matching sigma (`sampling.denoise`; no guidance needed, `steps` capped by that
    level). Linear `operator`: DDPM from pure noise (`steps` capped by T) with `observation_guided_denoiser`,
    images of `shape` (C, *spatial; the observation's own shape by default).
    """
    if operator is None:
        return denoise(classifier, observed.expand(n, *observed.shape[1:]), schedule, sigma, method="ddpm",
                       steps=steps, generator=generator)  # fmt: skip
    shape = tuple(observed.shape[1:]) if shape is None else tuple(shape)
    guided = observation_guided_denoiser(classifier, schedule, observed, sigma, operator, generator)
    return sample(classifier, schedule, (n, *shape), "ddpm", min(steps, schedule.T), generator=generator,
                  denoiser=guided, dtype=observed.dtype, device=observed.device)  # fmt: skip


def posterior_mean(
    classifier: Classifier,
    schedule: NoiseSchedule,
    observed: Tensor,
    sigma: float,
    operator: Optional[Operator] = None,
    samples: Optional[Tensor] = None,
) -> Tensor:
    """E[x | y] (1, C, *spatial): Tweedie's one-step estimate for the identity (exact when sigma matches a level),
    else the mean of posterior `samples`."""
    if operator is None:
        return denoise(classifier, observed, schedule, sigma)
    if samples is None:
        raise ValueError("the posterior mean under a degradation operator needs posterior samples")
    return samples.mean(0, keepdim=True)
