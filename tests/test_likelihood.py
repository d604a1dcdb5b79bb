import math

import pytest
import torch
from closed_form import ConditionalMixture, GaussianMixture, UniformCube, random_mixture

from cdm_ood import NoiseSchedule, bits_per_dim, log_likelihood, log_likelihood_profile

SHAPES = {"image2d": (1, 6, 6), "volume3d": (1, 3, 3, 3)}
SCHEDULES = {"linear": NoiseSchedule.linear(1000), "uniform": NoiseSchedule.uniform(200)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("K", [1, 3], ids=["gaussian", "mixture"])
def test_profile_equals_exact_log_density(shape, schedule, K):
    gm = random_mixture(shape, schedule, K)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([gm.sample(8, g), torch.randn((8, *shape), generator=g, dtype=torch.float64)])
    profile = log_likelihood_profile(gm, x, schedule)
    assert profile.shape == (16, schedule.T + 2) and profile.dtype == torch.float64
    torch.testing.assert_close(profile, gm.log_density(x), rtol=1e-8, atol=0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_log_likelihood_at_fixed_and_per_sample_t(shape):
    schedule = SCHEDULES["linear"]
    gm = random_mixture(shape, schedule)
    x = gm.sample(6, torch.Generator().manual_seed(2))
    exact = gm.log_density(x)
    torch.testing.assert_close(log_likelihood(gm, x, schedule), exact[:, 0], rtol=1e-8, atol=0)
    torch.testing.assert_close(log_likelihood(gm, x, schedule, t=500), exact[:, 500], rtol=1e-8, atol=0)
    t = torch.tensor([0, 1, 10, 999, 1000, 1001])
    torch.testing.assert_close(log_likelihood(gm, x, schedule, t=t), exact[torch.arange(6), t], rtol=1e-8, atol=0)


def test_a_label_gives_the_density_of_its_class():
    """Theorem 3.2 for a class-conditional classifier F(x | k): log p_t(x | k), here the density of component k."""
    schedule = SCHEDULES["linear"]
    gm = random_mixture(SHAPES["image2d"], schedule, K=2)
    conditional = ConditionalMixture(gm.log_weights.exp(), gm.means, gm.stds, schedule, null_label=2)
    components = [GaussianMixture(torch.ones(1), gm.means[k : k + 1], gm.stds[k : k + 1], schedule) for k in (0, 1)]
    x = gm.sample(6, torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    exact = torch.where(labels[:, None] == 0, components[0].log_density(x), components[1].log_density(x))
    for t in (0, 300):
        got = log_likelihood(conditional, x, schedule, t=t, labels=labels)
        torch.testing.assert_close(got, exact[:, t], rtol=1e-8, atol=0)


def test_log_likelihood_is_unchanged_by_a_per_input_constant_in_the_logits():
    """F_t = log p_t(x) + c(x) gives the same density: c(x) cancels in F_t - F_{T+1}."""
    schedule = SCHEDULES["uniform"]
    gm = random_mixture(SHAPES["image2d"], schedule)
    x = gm.sample(5, torch.Generator().manual_seed(3))

    def shifted(z):
        return gm(z) + 17.0 * z.flatten(1).sum(1, keepdim=True).sin()

    expected = log_likelihood(gm, x, schedule)
    torch.testing.assert_close(log_likelihood(shifted, x, schedule), expected, rtol=1e-10, atol=0)


def test_one_forward_pass_and_no_gradient():
    schedule = SCHEDULES["uniform"]
    gm = random_mixture(SHAPES["image2d"], schedule)
    calls = []

    def counting(z):
        calls.append(z.shape[0])
        return gm(z)

    x = gm.sample(4, torch.Generator().manual_seed(4)).requires_grad_(True)
    profile = log_likelihood_profile(counting, x, schedule)
    assert calls == [4]
    assert not profile.requires_grad


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bit_depth", [8, 12, 16])
def test_uniform_data_has_bit_depth_bits_per_dim(shape, bit_depth):
    schedule = NoiseSchedule.linear(1000)
    exact = UniformCube(schedule)
    x = 2 * torch.rand((7, *shape), generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 1
    ll = log_likelihood(exact, x, schedule)
    d = math.prod(shape)
    torch.testing.assert_close(ll, torch.full((7,), -d * math.log(2.0), dtype=torch.float64), rtol=1e-12, atol=0)
    bpd = bits_per_dim(ll, d, bit_depth)
    torch.testing.assert_close(bpd, torch.full_like(bpd, float(bit_depth)), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_uniform_cube_classifier_is_a_normalised_density_at_every_t():
    """Sanity of the test oracle itself: its noisy-level densities integrate to 1 in one dimension."""
    schedule = NoiseSchedule.linear(1000)
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float64)[:, None]
    density = UniformCube(schedule)(grid)[:, 1:].exp()
    mass = torch.trapezoid(density, grid[:, 0], dim=0)
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-6)


def test_wrong_logit_count_is_a_clear_error():
    schedule = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match=r"T\+2=12"):
        log_likelihood(lambda z: torch.zeros(z.shape[0], 11), torch.zeros(2, 1, 4, 4), schedule)
