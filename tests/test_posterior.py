"""The posterior of y = A x + sigma n on an exact Gaussian prior: Tweedie's mean, guided samples, their parts."""

import math

import pytest
import torch
from monai.networks.layers import GaussianFilter
from test_ranking import F64, MU, SCHEDULE, SHAPE, D, S
from test_ranking import GAUSSIAN as PRIOR

from cdm_ood.diffusion.posterior import adjoint, conjugate_gradient, posterior_mean, posterior_samples, step_along


def blur(x: torch.Tensor) -> torch.Tensor:
    return GaussianFilter(2, 1.0).to(torch.float64)(x)


def matrix(operator, shape=SHAPE) -> torch.Tensor:
    """The operator as a (d_out, d_in) matrix, column by column."""
    basis = torch.eye(D, **F64).reshape(D, *shape)
    return operator(basis).reshape(D, -1).T


def exact_posterior(y: torch.Tensor, sigma: float, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(mu, s^2 I), y = A x + sigma n: Cov = (I / s^2 + A^T A / sigma^2)^-1, mean = Cov (mu / s^2 + A^T y /
    sigma^2)."""
    cov = torch.linalg.inv(torch.eye(D, **F64) / S**2 + a.T @ a / sigma**2)
    mean = cov @ (torch.full((D,), MU / S**2, **F64) + a.T @ y.flatten() / sigma**2)
    return mean.reshape(1, *SHAPE), cov


def observation(sigma: float, operator=None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    clean = PRIOR.sample(1, g)
    return (clean if operator is None else operator(clean)) + sigma * torch.randn(clean.shape, generator=g, **F64)


def test_adjoint_and_conjugate_gradient_are_the_matrix_transpose_and_solve():
    a = matrix(blur)
    u = torch.randn(3, *SHAPE, **F64)
    torch.testing.assert_close(adjoint(blur, u, u).reshape(3, D), u.reshape(3, D) @ a, rtol=0, atol=1e-12)
    m = 0.05 * torch.eye(D, **F64) + 0.3 * a @ a.T
    got = conjugate_gradient(lambda v: (v.reshape(3, D) @ m.T).reshape(v.shape), u)
    torch.testing.assert_close(got.reshape(3, D), torch.linalg.solve(m, u.reshape(3, D).T).T, rtol=0, atol=1e-9)


def test_tweedie_is_the_exact_posterior_mean_of_a_noisy_observation():
    t = 200
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    y = observation(sigma)
    expected, _ = exact_posterior(y, sigma, torch.eye(D, **F64))
    torch.testing.assert_close(posterior_mean(PRIOR, SCHEDULE, y, sigma), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("operator", [None, blur], ids=["identity", "blur"])
def test_posterior_samples_have_the_exact_posterior_mean_and_variance(operator):
    """Guided DDPM with the exact Gaussian likelihood of y given x_t: the samples' mean is the posterior's within
    Monte Carlo error (the prior's mean is 10 standard errors away or more); their variance is within 20% of it
    (ancestral DDPM steps use the lower posterior variance beta~ and under-disperse by 10-15% at 100 steps)."""
    sigma, n = 0.2, 1000
    y = observation(sigma, operator)
    mean, cov = exact_posterior(y, sigma, matrix(operator or (lambda x: x)))
    samples = posterior_samples(PRIOR, SCHEDULE, y, sigma, n, operator, SHAPE, steps=100,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    standard_error = (cov.diagonal() / n).sqrt().reshape(1, *SHAPE)
    error = (samples.mean(0, keepdim=True) - mean) / standard_error
    assert error.abs().max() < 4.5, error
    assert ((mean - MU).abs() / standard_error).max() > 10, "the test can tell the posterior from the prior"
    variance = samples.var(0).mean().item()
    assert math.isclose(variance, cov.diagonal().mean().item(), rel_tol=0.2), (variance, cov.diagonal().mean())


def _line_case(exact: bool):
    """A non-isotropic Gaussian C, A a blur, r a residual; w solves with the full M (`exact`) or with C isotropic."""
    g = torch.Generator().manual_seed(3)
    a, sigma = matrix(blur), 0.1
    c = torch.diag(0.05 + torch.rand(D, generator=g, **F64))
    r = torch.randn(D, generator=g, **F64)
    inner = c if exact else c.diagonal().mean() * torch.eye(D, **F64)
    w = torch.linalg.solve(sigma**2 * torch.eye(D, **F64) + a @ inner @ a.T, r)
    direction, weighted = c @ a.T @ w, a.T @ w
    shaped = [v.reshape(1, *SHAPE) for v in (direction, a @ direction, r, weighted)]
    return step_along(*shaped, sigma).flatten(), direction, a, c, r, sigma


def test_step_along_is_the_exact_update_when_the_solve_is_exact():
    """With w = (sigma^2 I + A C A^T)^{-1} r, C A^T w is already the exact posterior update: lambda = 1."""
    step, direction, *_ = _line_case(exact=True)
    torch.testing.assert_close(step, direction, rtol=0, atol=1e-12)


def test_step_along_is_the_most_probable_point_on_the_line():
    """With C taken isotropic in M, lambda maximises log N(y; A(x0 + l d), sigma^2) - l^2 d^T C^-1 d / 2 over l."""
    step, direction, a, c, r, sigma = _line_case(exact=False)
    grid = torch.linspace(0, 1, 10001, **F64)
    misfit = (r[None] - grid[:, None] * (a @ direction)[None]).square().sum(1) / (2 * sigma**2)
    log_density = -misfit - grid**2 * (direction @ torch.linalg.solve(c, direction)) / 2
    best = grid[log_density.argmax()]
    lam = (step @ direction) / (direction @ direction)
    assert 0.05 < best < 0.95, "the isotropic solve is off the exact step, so the test can fail"
    assert abs(lam - best) < 2e-4, (lam, best)
