"""OOD detectors on exact likelihood profiles of a Gaussian (closed form, math sheet)."""

import math

import pytest
import torch
from closed_form import GaussianMixture

from cdm_ood import NoiseSchedule, log_likelihood_profile
from cdm_ood.ood import Detector, MultiscaleDetector, NLLDetector, NotFittedError
from cdm_ood.ood.metrics import ood_metrics

SCHEDULE = NoiseSchedule.linear(200)
SHAPE = (1, 4, 4)
D = 16
S = 0.4
GAUSSIAN = GaussianMixture(torch.ones(1), torch.zeros(1, *SHAPE), torch.tensor([S]), SCHEDULE)


def profiles(x: torch.Tensor) -> torch.Tensor:
    return log_likelihood_profile(GAUSSIAN, x, SCHEDULE)


def draw(n: int, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(n, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_nll_is_the_closed_form_bits_per_dim():
    x = draw(5, S, 0)
    log_p0 = -0.5 * D * math.log(2 * math.pi * S**2) - 0.5 * x.flatten(1).square().sum(1) / S**2
    expected = -log_p0 / (D * math.log(2)) + 7
    torch.testing.assert_close(NLLDetector(D, 8).score(profiles(x)), expected)


def test_multiscale_catches_too_likely_images_that_the_likelihood_prefers():
    """Near-constant images have *higher* density than typical ones under N(0, s^2 I): the raw likelihood ranks
    them as more in-distribution; the profile model sees they are atypical at every noise scale."""
    fit, test_id, flat = profiles(draw(400, S, 1)), profiles(draw(200, S, 2)), profiles(draw(200, 0.05, 3))
    nll, multiscale = NLLDetector(D), MultiscaleDetector(D).fit(fit)
    assert ood_metrics(nll.score(test_id).numpy(), nll.score(flat).numpy())["auroc"] < 0.05
    assert ood_metrics(multiscale.score(test_id).numpy(), multiscale.score(flat).numpy())["auroc"] > 0.99


def test_both_detect_a_wider_distribution():
    fit, test_id, wide = profiles(draw(400, S, 1)), profiles(draw(200, S, 2)), profiles(draw(200, 0.8, 4))
    for detector in (NLLDetector(D), MultiscaleDetector(D).fit(fit)):
        assert ood_metrics(detector.score(test_id).numpy(), detector.score(wide).numpy())["auroc"] > 0.99


def test_state_round_trip_gives_the_same_scores():
    fit, x = profiles(draw(100, S, 1)), profiles(draw(7, 0.6, 5))
    for detector in (NLLDetector(D, 11), MultiscaleDetector(D, 11).fit(fit)):
        state = detector.state()
        assert all(isinstance(v, (str, int, list)) for v in state.values()), "plain data only (weights-only load)"
        torch.testing.assert_close(Detector.from_state(state).score(x), detector.score(x))


def test_multiscale_uses_clean_noised_and_prior_levels():
    detector = MultiscaleDetector(D).fit(profiles(draw(50, S, 1)))
    assert detector.columns[0] == 0 and detector.columns[-1] == SCHEDULE.T + 1 and len(detector.columns) == 16


def test_unfitted_and_unknown_detectors_fail_clearly():
    with pytest.raises(NotFittedError, match="not fitted"):
        MultiscaleDetector(D).score(profiles(draw(2, S, 0)))
    with pytest.raises(ValueError, match="at least 2"):
        MultiscaleDetector(D).fit(profiles(draw(1, S, 0)))
    with pytest.raises(ValueError, match="unknown detector 'knn'"):
        Detector.from_state({"name": "knn", "num_dims": D, "bit_depth": 8})
