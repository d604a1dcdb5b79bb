import pytest
import torch
from closed_form import GaussianMixture, random_mixture

from cdm_ood import NoiseSchedule, predict_noise, predict_x0
from cdm_ood.diffusion.schedules import diffuse

SHAPES = {"image2d": (1, 6, 6), "volume3d": (1, 3, 3, 3)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000), NoiseSchedule.uniform(100)], ids=["linear", "unif"])
@pytest.mark.parametrize("K", [1, 3], ids=["gaussian", "mixture"])
def test_predict_noise_is_the_exact_posterior_mean(shape, schedule, K):
    gm = random_mixture(shape, schedule, K, seed=10, spread=0.7)
    g = torch.Generator().manual_seed(11)
    B = 24
    t = torch.randint(0, schedule.T + 2, (B,), generator=g)
    t[:3] = torch.tensor([0, 1, schedule.T + 1])
    x_t = diffuse(gm.sample(B, g), t, torch.randn((B, *shape), generator=g, dtype=torch.float64), schedule)
    eps_hat = predict_noise(gm, x_t, t, schedule)
    assert eps_hat.dtype == torch.float64 and eps_hat.shape == x_t.shape
    torch.testing.assert_close(eps_hat, gm.posterior_noise(x_t, t), rtol=1e-8, atol=1e-8)


def test_endpoints_are_exact():
    schedule = NoiseSchedule.linear(1000)
    gm = random_mixture((1, 4, 4), schedule, 2, seed=10, spread=0.7)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    assert torch.equal(predict_noise(gm, x, 0, schedule), torch.zeros_like(x))
    assert torch.equal(predict_noise(gm, x, schedule.T + 1, schedule), x)


def test_gaussian_case_matches_the_textbook_formula_and_x0_estimate():
    """x0 ~ N(mu, s^2 I): E[eps|x_t] = sigma_t (x - sqrt(abar_t) mu) / v_t and
    E[x0|x_t] = mu + sqrt(abar_t) s^2 (x - sqrt(abar_t) mu) / v_t."""
    schedule = NoiseSchedule.uniform(50)
    mu, s = torch.full((1, 1, 3, 3), 0.3, dtype=torch.float64), 0.2
    gm = GaussianMixture(torch.ones(1), mu, torch.tensor([s], dtype=torch.float64), schedule)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    t = 20
    abar = schedule.alpha_bar[t]
    v = abar * s**2 + 1 - abar
    eps_hat = predict_noise(gm, x, t, schedule)
    torch.testing.assert_close(eps_hat, schedule.sigma[t] * (x - abar.sqrt() * mu) / v, rtol=1e-10, atol=1e-12)
    x0_hat = predict_x0(eps_hat, x, t, schedule)
    torch.testing.assert_close(x0_hat, mu + abar.sqrt() * s**2 * (x - abar.sqrt() * mu) / v, rtol=1e-10, atol=1e-12)


def test_no_graph_is_kept_without_create_graph():
    schedule = NoiseSchedule.linear(100)
    gm = random_mixture((1, 4, 4), schedule, 2, seed=10, spread=0.7)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        eps_hat = predict_noise(gm, x, 30, schedule)
    assert not eps_hat.requires_grad and not x.requires_grad
