import re

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from cdm_ood import NoiseSchedule, diffuse
from cdm_ood.diffusion.schedules import at, timesteps
from cdm_ood.jobs.config import ScheduleConfig


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.uniform, NoiseSchedule.cosine])
@pytest.mark.parametrize("T", [1, 10, 1000])
def test_endpoints_and_shape(make, T):
    s = make(T=T)
    assert s.alpha_bar.dtype == torch.float64 and s.alpha_bar.shape == (T + 2,)
    assert s.alpha_bar[0].item() == 1.0 and s.alpha_bar[-1].item() == 0.0
    assert s.sigma[0].item() == 0.0 and s.sigma[-1].item() == 1.0
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1]), "alpha_bar must strictly decrease"
    assert s.num_classes == T + 2


def test_linear_is_the_ddpm_cumulative_product():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(s.alpha_bar[1:-1].numpy(), expected, rtol=1e-12)
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(s.alpha_bar[1:-1].numpy(), monai.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_uniform_sigma_is_t_over_t_max_plus_one():
    T = 37
    s = NoiseSchedule.uniform(T)
    expected = torch.arange(T + 2, dtype=torch.float64) / (T + 1)
    torch.testing.assert_close(s.sigma, expected, rtol=1e-14, atol=1e-14)


def test_cosine_matches_its_formula_where_unclipped():
    T, off = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    t = np.arange(1, T + 1)
    f = np.cos((t / T + off) / (1 + off) * np.pi / 2) ** 2 / np.cos(off / (1 + off) * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alpha_bar[1:900].numpy(), f[:899], rtol=1e-10)
    assert s.alpha_bar[T].item() > 0, "clipping beta keeps alpha_bar_T above the pure-noise class"


@pytest.mark.parametrize("s", [NoiseSchedule.linear(50, 2e-4, 0.03), NoiseSchedule.uniform(9), NoiseSchedule.cosine(7)])
def test_config_round_trip(s):
    config = ScheduleConfig(kind=s.kind, T=s.T, **{k: v for k, v in s.params.items() if k.startswith("beta")})
    back = NoiseSchedule.from_config(config)
    assert back == s and back.to_dict() == s.to_dict()
    assert torch.equal(back.alpha_bar, s.alpha_bar)
    assert all(isinstance(v, (str, int, float)) for v in s.to_dict().values())


def test_defaults_and_the_dictionary_a_checkpoint_stores():
    assert NoiseSchedule.linear() == NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert NoiseSchedule.cosine() == NoiseSchedule.cosine(1000, 0.008, 0.999)
    assert NoiseSchedule.uniform().T == 1000
    assert NoiseSchedule.linear(50, 2e-4, 0.03).to_dict() == {"kind": "linear", "T": 50, "beta_start": 2e-4,
                                                               "beta_end": 0.03}  # fmt: skip
    assert NoiseSchedule.cosine(7).to_dict() == {"kind": "cosine", "T": 7, "s": 0.008, "max_beta": 0.999}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "quadratic", "T": 10}, "unknown noise schedule"), ({"kind": "linear", "T": 0}, "positive integer")],
)
def test_invalid_schedules_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config(ScheduleConfig(**kwargs))


def test_diffuse_endpoints_and_scale():
    s = NoiseSchedule.linear(100)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g)
    eps = eps.double()
    assert torch.equal(diffuse(x0, 0, eps, s), x0)
    assert torch.equal(diffuse(x0, s.T + 1, eps, s), eps)
    t = torch.tensor([0, 50, 101])
    x_t = diffuse(x0, t, eps, s)
    torch.testing.assert_close(x_t[1], s.alpha_bar[50].sqrt() * x0[1] + (1 - s.alpha_bar[50]).sqrt() * eps[1])


def test_bad_schedules_are_named_exactly():
    """The schedule itself refuses an unknown kind and a T that is not a positive integer, as from_config does."""
    unknown = "unknown noise schedule 'quadratic'; expected one of ('linear', 'uniform', 'cosine')"
    with pytest.raises(ValueError, match=f"^{re.escape(unknown)}$"):
        NoiseSchedule("quadratic", 10)
    with pytest.raises(ValueError, match=f"^{re.escape(unknown)}$"):
        NoiseSchedule.from_config(ScheduleConfig(kind="quadratic", T=10))
    for T in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"^{re.escape(f'T must be a positive integer, got {T!r}')}$"):
            NoiseSchedule("linear", T, {"beta_start": 1e-4, "beta_end": 0.02})


def test_timesteps_and_per_sample_values_broadcast_against_the_batch():
    x = torch.zeros(3, 2, 4, 4)
    assert torch.equal(timesteps(5, x), torch.tensor([5, 5, 5]))
    assert timesteps(torch.tensor([1, 2, 3], dtype=torch.int32), x).dtype == torch.long
    values = torch.arange(10, dtype=torch.float64) / 10
    picked = at(values, torch.tensor([1, 4, 9]), x)
    assert picked.dtype == torch.float32 and picked.shape == (3, 1, 1, 1)
    assert torch.equal(picked.flatten(), torch.tensor([0.1, 0.4, 0.9], dtype=torch.float32))
