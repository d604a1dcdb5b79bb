import pytest
import torch
from closed_form import ConditionalMixture, GaussianMixture, random_mixture

from cdm_ood import NoiseSchedule, cdm_loss
from cdm_ood.diffusion.schedules import diffuse

SHAPES = {"image2d": (1, 6, 6), "volume3d": (1, 3, 3, 3)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("K", [1, 3], ids=["gaussian", "mixture"])
def test_loss_terms_equal_the_bayes_optimal_values(shape, K):
    schedule = NoiseSchedule.linear(1000)
    gm = random_mixture(shape, schedule, K, seed=20, spread=0.5)
    g = torch.Generator().manual_seed(21)
    B = 32
    x0 = gm.sample(B, g)
    t = torch.randint(0, schedule.T + 2, (B,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = cdm_loss(gm, x0, schedule, t=t, noise=eps, ce_weight=0.3, mse_weight=2.0)

    x_t = diffuse(x0, t, eps, schedule)
    bayes_mse = (gm.posterior_noise(x_t, t) - eps).square().mean()
    log_p = gm.log_density(x_t)
    exact_ce = (torch.logsumexp(log_p, 1) - log_p[torch.arange(B), t]).mean()
    torch.testing.assert_close(out.mse, bayes_mse, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.ce, exact_ce, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.loss, 2.0 * bayes_mse + 0.3 * exact_ce, rtol=1e-8, atol=1e-12)
    assert out.accuracy == (log_p.argmax(1) == t).double().mean()


def test_expected_mse_is_the_gaussian_mmse():
    """x0 ~ N(mu, s^2 I): E||eps - E[eps|x_t]||^2 / d = 1 - sigma_t^2 / v_t, checked by Monte Carlo."""
    schedule = NoiseSchedule.uniform(20)
    s = 0.5
    gm = GaussianMixture(torch.ones(1), torch.full((1, 1, 4, 4), -0.2), torch.tensor([s]), schedule)
    g = torch.Generator().manual_seed(22)
    for t in [3, 10, 19]:
        x0 = gm.sample(8192, g)
        out = cdm_loss(gm, x0, schedule, t=t, generator=g)
        abar = schedule.alpha_bar[t]
        mmse = 1 - (1 - abar) / (abar * s**2 + 1 - abar)
        torch.testing.assert_close(out.mse, mmse, rtol=0.02, atol=0)


def test_random_draws_follow_the_generator_and_cover_all_levels():
    schedule = NoiseSchedule.linear(4)
    gm = random_mixture((1, 2, 2), schedule, 2, seed=20, spread=0.5)
    x0 = gm.sample(64, torch.Generator().manual_seed(23))
    a = cdm_loss(gm, x0, schedule, generator=torch.Generator().manual_seed(5))
    b = cdm_loss(gm, x0, schedule, generator=torch.Generator().manual_seed(5))
    c = cdm_loss(gm, x0, schedule, generator=torch.Generator().manual_seed(6))
    assert a.loss == b.loss and a.loss != c.loss


def test_the_draws_are_every_level_and_noise_in_the_data_dtype_under_the_default_weights():
    """Without `t` and `noise`, Algorithm 1 draws t ~ U{0..T+1} and eps ~ N(0, I) in x0's dtype from the generator,
    in that order; the loss is then 1.0 * mse + 1e-3 * ce, and the accuracy that of the exact classifier."""
    schedule = NoiseSchedule.linear(4)
    gm = random_mixture((1, 2, 2), schedule, 2, seed=20, spread=0.5)
    x0 = gm.sample(64, torch.Generator().manual_seed(23))
    out = cdm_loss(gm, x0, schedule, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, schedule.T + 2, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert set(t.tolist()) == set(range(schedule.T + 2))
    fixed = cdm_loss(gm, x0, schedule, t=t, noise=eps, ce_weight=1e-3, mse_weight=1.0)
    assert (out.loss, out.mse, out.ce, out.accuracy) == (fixed.loss, fixed.mse, fixed.ce, fixed.accuracy)
    exact = (gm.log_density(diffuse(x0, t, eps, schedule)).argmax(1) == t).double().mean()
    assert out.accuracy == exact and exact > 0.3


def test_labels_reach_the_classifier():
    schedule = NoiseSchedule.linear(50)
    gm = random_mixture((1, 2, 2), schedule, 2, seed=20, spread=0.5)
    conditional = ConditionalMixture(gm.log_weights.exp(), gm.means, gm.stds, schedule, null_label=2)
    g = torch.Generator().manual_seed(24)
    x0, labels = gm.sample(16, g), torch.randint(0, 2, (16,), generator=g)
    t, eps = torch.randint(0, schedule.T + 2, (16,), generator=g), torch.randn(16, 1, 2, 2, generator=g).double()
    log_p = conditional(diffuse(x0, t, eps, schedule), labels)
    exact_ce = (torch.logsumexp(log_p, 1) - log_p[torch.arange(16), t]).mean()
    out = cdm_loss(conditional, x0, schedule, t=t, noise=eps, labels=labels)
    torch.testing.assert_close(out.ce, exact_ce, rtol=1e-8, atol=1e-12)


def test_the_mse_term_trains_the_network_and_draws_stay_on_its_device():
    """The MSE of the gradient denoiser reaches the weights (a second-order graph); on another device (here
    `meta`) every draw is made there."""
    schedule = NoiseSchedule.linear(10)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12))
    out = cdm_loss(net, torch.randn(8, 1, 4, 4), schedule, ce_weight=0.0)
    out.loss.backward()
    assert net[1].weight.grad.abs().sum() > 0
    on_meta = cdm_loss(net.to("meta"), torch.randn(8, 1, 4, 4, device="meta"), schedule)
    assert on_meta.loss.device.type == "meta"


def test_ce_only_builds_no_second_order_graph():
    schedule = NoiseSchedule.linear(10)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12))
    x0 = torch.randn(8, 1, 4, 4)
    out = cdm_loss(net, x0, schedule, mse_weight=0.0)
    assert out.ce.requires_grad and not out.mse.requires_grad
    out.loss.backward()
    assert net[1].weight.grad is not None
