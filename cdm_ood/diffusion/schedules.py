"""Noise schedules over the CDM noise levels t = 0 (clean) .. T+1 (pure noise), and the forward process."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError

KINDS = ("linear", "uniform", "cosine")


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_bar_t for t = 0..T+1 with alpha_bar_0 = 1 (clean data) and alpha_bar_{T+1} = 0 (N(0, I) noise).

    Build one with `linear`, `uniform` or `cosine`, or from a run config with `from_config` (the one way configs
    and checkpoints build it); `to_dict` records it in plain Python types next to the weights.
    """

    kind: str
    T: int
    params: dict[str, float] = field(default_factory=dict)
    alpha_bar: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown noise schedule {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.T, int) or self.T < 1:
            raise UsageError(f"T must be a positive integer, got {self.T!r}")
        inner = _INNER[self.kind](self.T, **self.params)
        alpha_bar = torch.cat([inner.new_ones(1), inner, inner.new_zeros(1)])
        object.__setattr__(self, "alpha_bar", alpha_bar)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM: beta_t linearly spaced, alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
        return cls("linear", T, {"beta_start": float(beta_start), "beta_end": float(beta_end)})

    @classmethod
    def uniform(cls, T: int = 1000) -> NoiseSchedule:
        """CDM(unif.): sigma_t = t / (T+1), i.e. alpha_bar_t = 1 - (t / (T+1))^2."""
        return cls("uniform", T)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Improved DDPM: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta_t <= max_beta."""
        return cls("cosine", T, {"s": float(s), "max_beta": float(max_beta)})

    @property
    def num_classes(self) -> int:
        """Number of noise-level classes, T + 2 (t = 0 .. T+1)."""
        return self.T + 2

    @property
    def sqrt_alpha_bar(self) -> Tensor:
        """sqrt(alpha_bar_t), the signal scale of x_t."""
        return self.alpha_bar.sqrt()

    @property
    def sigma(self) -> Tensor:
        """sigma_t = sqrt(1 - alpha_bar_t), the noise std of x_t."""
        return (1.0 - self.alpha_bar).sqrt()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "T": self.T, **self.params}

    @classmethod
    def from_config(cls, config: Any) -> NoiseSchedule:
        """The schedule a `cdm_ood.jobs.config.ScheduleConfig` describes (kind, T, and beta_start / beta_end for
        `linear`)."""
        if config.kind not in KINDS:
            raise UsageError(f"unknown noise schedule {config.kind!r}; expected one of {KINDS}")
        if config.kind == "linear":
            return cls.linear(config.T, config.beta_start, config.beta_end)
        return cls.uniform(config.T) if config.kind == "uniform" else cls.cosine(config.T)


def _linear(T: int, beta_start: float, beta_end: float) -> Tensor:
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _uniform(T: int) -> Tensor:
    sigma = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    return 1.0 - sigma**2


def _cosine(T: int, s: float, max_beta: float) -> Tensor:
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


_INNER = {"linear": _linear, "uniform": _uniform, "cosine": _cosine}


def timesteps(t: int | Tensor, x: Tensor) -> Tensor:
    """Noise levels as a (B,) long tensor on x's device; an int (or one level) applies to every sample of x."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).expand(x.shape[0])


def at(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """values[t] per sample, in x's dtype, shaped (B, 1, ..., 1) to broadcast against x."""
    return values.to(device=x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def diffuse(x0: Tensor, t: int | Tensor, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Forward process (paper eq. 3): x_t = sqrt(alpha_bar_t) x0 + sigma_t eps."""
    t = timesteps(t, x0)
    return at(schedule.sqrt_alpha_bar, t, x0) * x0 + at(schedule.sigma, t, x0) * noise
