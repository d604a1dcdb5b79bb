"""The 1D Gaussian mixture that every sampler must reproduce, its exact classifier and the accuracy rows:
one source for `tests/test_sampling.py` (which asserts the tolerances) and `benchmarks/sampler_accuracy.py`
(which prints the errors as the table of docs/sampling.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from closed_form import GaussianMixture

from cdm_ood import NoiseSchedule
from cdm_ood.diffusion.sampling import sample

SCHEDULE = NoiseSchedule.linear(1000)
WEIGHTS, MEANS, STDS = torch.tensor([0.3, 0.7]), torch.tensor([-0.5, 0.4]), torch.tensor([0.1, 0.15])
MIXTURE = GaussianMixture(WEIGHTS, MEANS.reshape(2, 1, 1, 1), STDS, SCHEDULE)


class Row(NamedTuple):
    """A sampler run on MIXTURE and the largest errors it may make: (weight, mean, relative std)."""

    method: str
    steps: int
    samples: int
    tolerance: tuple[float, float, float]


ROWS = [
    Row("ddpm", 1000, 300, (0.05, 0.02, 0.12)),  # every level: tight (300 samples keep the long runs short)
    Row("ddim", 500, 300, (0.05, 0.02, 0.12)),
    Row("ddpm", 100, 600, (0.05, 0.03, 0.25)),  # strided: discretisation error in the variance
    Row("ddim", 50, 600, (0.05, 0.04, 0.25)),
    Row("dpm2", 25, 600, (0.05, 0.05, 0.3)),
]


def draw(method: str, steps: int, n: int) -> torch.Tensor:
    """`n` samples of MIXTURE from its exact classifier, shape (n, 1, 1, 1), seed 0."""
    return sample(MIXTURE, SCHEDULE, (n, 1, 1, 1), method, steps, generator=torch.Generator().manual_seed(0))


def mixture_errors(x: torch.Tensor) -> tuple[float, float, float]:
    """Largest errors over the two components: |weight - w_k|, |mean - mu_k| and |std / s_k - 1|."""
    flat = x.flatten(1).double()
    k = (flat - MEANS.double()[None]).abs().argmin(1)
    dw = max(abs((k == j).double().mean().item() - WEIGHTS[j].item()) for j in range(2))
    dm = max(abs(flat[k == j].mean().item() - MEANS[j].item()) for j in range(2))
    ds = max(abs(flat[k == j].std().item() / STDS[j].item() - 1) for j in range(2))
    return dw, dm, ds
