"""Exact classifiers F_t(x) = log p_t(x) for data with closed-form noisy densities (math sheet, last section)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cdm_ood import NoiseSchedule


class GaussianMixture:
    """x0 ~ sum_k pi_k N(mu_k, s_k^2 I) in any sample shape; K = 1 is the plain Gaussian case."""

    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor, schedule: NoiseSchedule) -> None:
        weights = weights.double()
        self.log_weights = (weights / weights.sum()).log()
        self.means = means.double()  # (K, *sample_shape)
        self.stds = stds.double()
        self.schedule = schedule

    def _log_components(self, x: Tensor) -> Tensor:
        """log pi_k + log N(x; sqrt(abar_t) mu_k, v_kt I) with v_kt = abar_t s_k^2 + 1 - abar_t: (B, K, T+2)."""
        flat, mu = x.flatten(1).double(), self.means.flatten(1)
        d = flat.shape[1]
        abar = self.schedule.alpha_bar
        v = abar[None, :] * self.stds[:, None] ** 2 + 1 - abar[None, :]  # (K, T+2)
        sq = (
            flat.square().sum(1)[:, None, None]
            - 2 * abar.sqrt()[None, None, :] * (flat @ mu.T)[:, :, None]
            + abar[None, None, :] * mu.square().sum(1)[None, :, None]
        )
        return self.log_weights[None, :, None] - 0.5 * d * torch.log(2 * math.pi * v)[None] - 0.5 * sq / v[None]

    def log_density(self, x: Tensor) -> Tensor:
        """Exact log p_t(x) for every t: (B, T+2)."""
        return torch.logsumexp(self._log_components(x), dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        """The Bayes-optimal classifier with a uniform prior over t: F_t(x) = log p_t(x)."""
        return self.log_density(x).to(x.dtype)

    def posterior_noise(self, x: Tensor, t: Tensor) -> Tensor:
        """E[eps | x_t = x] = sigma_t sum_k r_k(x) (x - sqrt(abar_t) mu_k) / v_kt, in closed form."""
        resp = torch.softmax(self._log_components(x), dim=1)  # (B, K, T+2)
        abar, sigma = self.schedule.alpha_bar[t], self.schedule.sigma[t]  # (B,)
        v = abar[:, None] * self.stds[None, :] ** 2 + 1 - abar[:, None]  # (B, K)
        r = resp.gather(2, t[:, None, None].expand(-1, resp.shape[1], 1)).squeeze(2)  # (B, K)
        flat, mu = x.flatten(1).double(), self.means.flatten(1)
        resid = flat[:, None, :] - abar.sqrt()[:, None, None] * mu[None]  # (B, K, d)
        eps = sigma[:, None] * (r[:, :, None] * resid / v[:, :, None]).sum(1)
        return eps.reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k].reshape(-1, *[1] * (z.ndim - 1)) * z


class UniformCube:
    """x0 iid U[-1, 1] per element: p_t(x) = prod_i [Phi((x_i + a)/sigma) - Phi((x_i - a)/sigma)] / (2a)."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.flatten(1).double()[:, None, :]
        a = self.schedule.sqrt_alpha_bar[1:-1, None]
        s = self.schedule.sigma[1:-1, None]
        hi, lo = torch.special.log_ndtr((flat + a) / s), torch.special.log_ndtr((flat - a) / s)
        inner = (hi + torch.log1p(-torch.exp(lo - hi)) - torch.log(2 * a)).sum(2)
        inside = (flat.abs() <= 1).all(2).squeeze(1)
        clean = torch.full(inside.shape, -flat.shape[2] * math.log(2.0), dtype=torch.float64)
        clean = clean.masked_fill(~inside, -math.inf)[:, None]
        noise = (-0.5 * math.log(2 * math.pi) - 0.5 * flat.square()).sum(2)
        return torch.cat([clean, inner, noise], dim=1).to(x.dtype)


def random_mixture(
    shape: tuple[int, ...], schedule: NoiseSchedule, K: int = 3, seed: int = 0, spread: float = 0.6
) -> GaussianMixture:
    """A K-component mixture with random weights, means of scale `spread` and stds in [0.05, 0.35]."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(K, generator=g), 0)
    means = spread * torch.randn((K, *shape), generator=g)
    stds = 0.05 + 0.3 * torch.rand(K, generator=g)
    return GaussianMixture(weights, means, stds, schedule)


class ConditionalMixture(GaussianMixture):
    """A class-conditional exact classifier: label k is mixture component k; the null label is the whole mixture."""

    def __init__(self, *args, null_label: int) -> None:
        super().__init__(*args)
        self.null_label = null_label

    def __call__(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """F(x | labels); no labels means the null label, as for `CDMClassifier`."""
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_label)
        components = self._log_components(x) - self.log_weights[None, :, None]  # log N(x; component k) per t
        conditional = components.gather(
            1, labels.clamp(max=components.shape[1] - 1)[:, None, None].expand(-1, 1, components.shape[2])
        )
        joint = torch.logsumexp(self._log_components(x), dim=1, keepdim=True)
        return torch.where((labels == self.null_label)[:, None, None], joint, conditional).squeeze(1).to(x.dtype)
