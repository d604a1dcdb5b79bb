"""OOD features and detectors against closed forms: exact Gaussian / Gaussian-mixture classifiers (math sheet)."""

import math

import numpy as np
import pytest
import torch
from closed_form import ConditionalMixture, GaussianMixture

from cdm_ood import NoiseSchedule, log_likelihood_profile
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.ood import Detector, MultiscaleDetector, NLLDetector, NotFittedError, register_detector
from cdm_ood.ood.detectors import DETECTORS, applicable, required_features
from cdm_ood.ood.features import (
    class_log_likelihoods,
    class_posterior,
    compute_features,
    denoising_residuals,
    fixed_noise,
    flip_log_likelihoods,
)
from cdm_ood.ood.metrics import ood_metrics

SCHEDULE = NoiseSchedule.linear(200)
SHAPE = (1, 4, 4)
D = 16
S = 0.4
GAUSSIAN = GaussianMixture(torch.ones(1), torch.zeros(1, *SHAPE), torch.tensor([S]), SCHEDULE)
# An orientation-sensitive mixture: component means are ramps along the two axes (a mirrored image is unlikely).
RAMP = torch.linspace(-0.6, 0.6, 4, dtype=torch.float64)
MEANS = torch.stack([RAMP[None, :, None].expand(*SHAPE), RAMP[None, None, :].expand(*SHAPE)])
MIXTURE = ConditionalMixture(torch.tensor([0.3, 0.7]), MEANS, torch.tensor([0.15, 0.25]), SCHEDULE, null_label=2)


def unconditional(x: torch.Tensor) -> torch.Tensor:
    return MIXTURE(x)


def profiles(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"profile": log_likelihood_profile(GAUSSIAN, x, SCHEDULE)}


def draw(n: int, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(n, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def mixture_draw(n: int, seed: int) -> torch.Tensor:
    return MIXTURE.sample(n, torch.Generator().manual_seed(seed))


def all_features(x: torch.Tensor, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    classifier = MIXTURE if num_classes else unconditional
    return compute_features(classifier, x, SCHEDULE, required_features(applicable(num_classes), num_classes),
                            num_classes)  # fmt: skip


def test_nll_is_the_closed_form_bits_per_dim():
    x = draw(5, S, 0)
    log_p0 = -0.5 * D * math.log(2 * math.pi * S**2) - 0.5 * x.flatten(1).square().sum(1) / S**2
    expected = -log_p0 / (D * math.log(2)) + 7
    torch.testing.assert_close(NLLDetector(D, 8).score(profiles(x)), expected)


def test_denoising_residuals_are_the_closed_form_posterior_noise_residuals():
    """Theorem 3.1 on the exact mixture: eps_hat(x_t, t) - eps with the analytic E[eps | x_t] per level."""
    x, levels = mixture_draw(6, 0), [5, 40, 120]
    eps = fixed_noise(SHAPE).double()
    residuals = denoising_residuals(unconditional, x, SCHEDULE, levels)
    assert residuals.shape == (6, 3, *SHAPE)
    for k, t in enumerate(levels):
        tt = torch.full((6,), t)
        x_t = SCHEDULE.sqrt_alpha_bar[t] * x + SCHEDULE.sigma[t] * eps
        torch.testing.assert_close(residuals[:, k], MIXTURE.posterior_noise(x_t, tt) - eps)


def test_generative_posterior_is_bayes_rule_on_the_exact_components():
    x = mixture_draw(8, 1)
    class_ll = class_log_likelihoods(MIXTURE, x, SCHEDULE, 2)
    components = MIXTURE._log_components(x)[:, :, 0] - MIXTURE.log_weights  # log N(x; component y)
    torch.testing.assert_close(class_ll, components)
    exact = torch.softmax(components + MIXTURE.log_weights, dim=1).log()
    torch.testing.assert_close(class_posterior(class_ll, MIXTURE.log_weights), exact)
    uniform = torch.softmax(components, dim=1).log()
    torch.testing.assert_close(class_posterior(class_ll), uniform)


def test_flip_features_are_closed_form_densities_of_the_mirror_images():
    x = mixture_draw(5, 2)
    mirrored = flip_log_likelihoods(unconditional, x, SCHEDULE)
    log_p0 = MIXTURE.log_density
    assert mirrored.shape == (5, 2)
    torch.testing.assert_close(mirrored, torch.stack([log_p0(x.flip(a))[:, 0] for a in (2, 3)], dim=1))
    flip = DETECTORS["flip"](D).fit(all_features(mixture_draw(50, 3)))
    ratios = (log_p0(x)[:, :1] - mirrored) / D  # log p_0(x) - log p_0(flip x), per dimension
    torch.testing.assert_close(flip.score(all_features(x)), -((ratios - flip.mean) / flip.scale).amin(1))


def test_flip_detector_catches_mirrored_images_that_the_likelihood_misses():
    fit, test_id = all_features(mixture_draw(300, 3)), all_features(mixture_draw(200, 4))
    flipped = all_features(mixture_draw(200, 5).flip(-1).flip(-2))
    flip = DETECTORS["flip"](D).fit(fit)
    assert ood_metrics(flip.score(test_id).numpy(), flip.score(flipped).numpy())["auroc"] > 0.99


def test_multiscale_catches_too_likely_images_that_the_likelihood_prefers():
    """Near-constant images have *higher* density than typical ones under N(0, s^2 I): the raw likelihood ranks
    them as more in-distribution; the profile model sees they are atypical at every noise scale."""
    fit, test_id, flat = profiles(draw(400, S, 1)), profiles(draw(200, S, 2)), profiles(draw(200, 0.05, 3))
    nll, multiscale = NLLDetector(D), MultiscaleDetector(D).fit(fit)
    assert ood_metrics(nll.score(test_id).numpy(), nll.score(flat).numpy())["auroc"] < 0.05
    assert ood_metrics(multiscale.score(test_id).numpy(), multiscale.score(flat).numpy())["auroc"] > 0.99


def test_denoise_multiscale_and_combined_are_two_sided_and_the_map_sees_noise():
    """Images at their component's mean are *more* likely than typical ones (the raw likelihood passes them), and
    their denoising errors are too small; noisy images have errors too large."""
    fit, test_id = all_features(mixture_draw(300, 6)), all_features(mixture_draw(200, 7))
    component = torch.randint(2, (200,), generator=torch.Generator().manual_seed(1))
    means, noisy = all_features(MEANS[component].clone()), all_features(mixture_draw(200, 9) + 0.3 * draw(200, 1, 10))

    def auroc(detector: Detector, ood: dict) -> float:
        return ood_metrics(detector.score(test_id).numpy(), detector.score(ood).numpy())["auroc"]

    assert auroc(NLLDetector(D), means) < 0.1
    assert auroc(DETECTORS["denoise"](D).fit(fit), means) > 0.75
    for name in ("multiscale", "combined"):
        assert auroc(DETECTORS[name](D).fit(fit), means) > 0.95, name
    for name in ("denoise", "combined", "map"):
        assert auroc(DETECTORS[name](D).fit(fit), noisy) > 0.85, name


def test_map_is_high_where_the_image_departs_from_the_data():
    detector = DETECTORS["map"](D).fit(all_features(mixture_draw(300, 11)))
    x = mixture_draw(50, 12)
    x[:, 0, 1, 2] += 2.0  # one corrupted pixel
    maps = detector.maps(all_features(x))
    assert maps.shape == (50, 4, 4)
    assert (maps.flatten(1).argmax(1) == 1 * 4 + 2).double().mean() > 0.9


def test_the_pooled_scale_is_the_deviation_about_each_pixels_mean_over_all_pixels():
    """`pooled_scale`, per level: the root mean square of log(1 + error) less its own pixel's mean over every image
    and pixel, with n - 1 per pixel (the per-pixel deviations' denominator)."""
    n = 20
    levels = torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)  # two levels of different error scales
    errors = torch.rand(n, 2, 1, 6, 5, generator=torch.Generator().manual_seed(0)).square() * levels
    detector = DETECTORS["map"](30).fit({"residuals": errors.sqrt()})
    logs = errors.log1p()
    about = (logs - logs.mean(0)).square().sum(dim=(0, 2, 3, 4)) / (30 * (n - 1))
    assert detector.pooled_scale().shape == (2, 1, 1, 1)
    assert torch.allclose(detector.pooled_scale().flatten(), about.sqrt(), rtol=1e-5)
    assert detector.pooled_scale()[1] > 2 * detector.pooled_scale()[0]


def test_the_localisation_map_scales_each_level_by_its_own_pooled_deviation():
    """Two levels whose in-distribution log errors vary 50-fold (deviation 0.01 and 0.5): a departure of 0.1 at the
    quiet level (10 of its deviations) outweighs one of 0.5 at the loud level (1 of its own). One scale for all
    levels would put the peak at the loud level's pixel instead."""
    g = torch.Generator().manual_seed(2)
    logs = torch.stack([0.3 + 0.01 * torch.randn(200, 1, 6, 6, generator=g),
                        3.0 + 0.5 * torch.randn(200, 1, 6, 6, generator=g)], dim=1)  # fmt: skip
    detector = DETECTORS["map"](36).fit({"residuals": logs.expm1().sqrt()})
    new = detector.mean.clone()[None]
    new[0, 0, 0, 1, 1] += 0.1
    new[0, 1, 0, 4, 4] += 0.5
    maps = detector.anomaly_maps({"residuals": new.expm1().sqrt()}, 0.0)[0]
    scale = detector.pooled_scale().flatten()
    assert divmod(int(maps.argmax()), 6) == (1, 1)
    assert torch.isclose(maps[1, 1], (0.1 / scale[0]) / 2**0.5, rtol=1e-3)
    assert torch.isclose(maps[4, 4], (0.5 / scale[1]) / 2**0.5, rtol=1e-3)


def test_the_localisation_map_is_not_fooled_by_pixels_whose_error_never_varies():
    """Half of every in-distribution image is like air (log error 0.01, deviation 0.001), half like tissue (0.5,
    deviation 0.2). A new image with a slightly higher error in the air (0.02) and a defect in the tissue (1.5): the
    per-pixel standardised detection map peaks in the air (z = 10), the localisation map (pooled deviation, about
    0.14) at the defect."""
    g = torch.Generator().manual_seed(1)
    logs = torch.cat([0.01 + 0.001 * torch.randn(200, 1, 1, 8, 4, generator=g),
                      0.5 + 0.2 * torch.randn(200, 1, 1, 8, 4, generator=g)], dim=-1).clamp_min(0)  # fmt: skip
    detector = DETECTORS["map"](64).fit({"residuals": logs.expm1().sqrt()})
    new = torch.cat([torch.full((1, 1, 1, 8, 4), 0.02), torch.full((1, 1, 1, 8, 4), 0.5)], dim=-1)
    new[..., 4, 6] = 1.5
    for maps, peak in (
        (detector.maps({"residuals": new.expm1().sqrt()}), "air"),
        (detector.anomaly_maps({"residuals": new.expm1().sqrt()}, 0.0), "defect"),
    ):
        row, col = divmod(int(maps[0].argmax()), 8)
        assert ((row, col) == (4, 6)) == (peak == "defect") and (col < 4) == (peak == "air"), peak


@pytest.mark.parametrize("spatial", [(33, 33), (17, 17, 17)])
def test_anomaly_maps_are_the_pooled_maps_smoothed_by_a_gaussian_of_the_stated_width(spatial):
    """A map that is 1 at the centre pixel and 0 elsewhere (log1p(error) = 1 there against an in-distribution mean 0
    and deviation 1 at every pixel, so pooled too) becomes a Gaussian: the same mass and centre, a variance of
    `smoothing`^2 along every axis."""
    detector = DETECTORS["map"](int(np.prod(spatial)))
    detector.mean, detector.std = torch.zeros(1, 1, *spatial), torch.ones(1, 1, *spatial)
    residuals = torch.zeros(1, 1, 1, *spatial)
    centre = tuple(n // 2 for n in spatial)
    residuals[(0, 0, 0, *centre)] = math.sqrt(math.e - 1)
    assert detector.maps({"residuals": residuals})[0].sum() == pytest.approx(1.0)
    smoothed = detector.anomaly_maps({"residuals": residuals})[0].double()
    assert smoothed.sum() == pytest.approx(1.0, abs=1e-3)
    for axis, c in enumerate(centre):
        marginal = smoothed.sum([a for a in range(len(spatial)) if a != axis])
        position = torch.arange(spatial[axis], dtype=torch.float64) - c
        assert (marginal * position).sum() == pytest.approx(0.0, abs=1e-9)
        assert (marginal * position.square()).sum() == pytest.approx(detector.smoothing**2, rel=0.05)


def test_classifier_detector_flags_images_between_the_classes():
    fit = all_features(mixture_draw(100, 13), num_classes=2)
    detector = DETECTORS["classifier"](D, 8, 2).fit(fit)
    between = all_features(0.5 * (MEANS[0] + MEANS[1]).expand(50, *SHAPE) + 0.1 * draw(50, 1.0, 14), 2)
    test_id = all_features(mixture_draw(100, 15), 2)
    assert ood_metrics(detector.score(test_id).numpy(), detector.score(between).numpy())["auroc"] > 0.95


def test_multiscale_is_the_mahalanobis_distance_under_ledoit_wolf_on_standardised_features():
    """Computed directly (numpy, sklearn's LedoitWolf) on strongly correlated profiles of 16 columns, so the
    detector uses every column: z = (f - mean) / std on the fitted images, score = z P z^T with P the
    shrunk precision of the fitted z; the identity in place of P scores far from it."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, 16)) + 3.0 * np.ones((16, 16))  # a common factor: correlations near 0.9
    fit, new = (torch.from_numpy(rng.normal(size=(n, 16)) @ mixing.T - 40 * D) for n in (60, 8))
    detector = MultiscaleDetector(D).fit({"profile": fit})
    f = fit.numpy() / D
    mean, std = f.mean(0), f.std(0, ddof=1)
    precision = LedoitWolf().fit((f - mean) / std).precision_
    z = (new.numpy() / D - mean) / std
    expected = np.einsum("bi,ij,bj->b", z, precision, z)
    np.testing.assert_allclose(detector.score({"profile": new}).numpy(), expected, rtol=1e-9)
    assert not np.allclose((z * z).sum(1), expected, rtol=0.1), "the correlations matter"


def test_both_detect_a_wider_distribution():
    fit, test_id, wide = profiles(draw(400, S, 1)), profiles(draw(200, S, 2)), profiles(draw(200, 0.8, 4))
    for detector in (NLLDetector(D), MultiscaleDetector(D).fit(fit)):
        assert ood_metrics(detector.score(test_id).numpy(), detector.score(wide).numpy())["auroc"] > 0.99


@pytest.mark.parametrize("num_classes", [None, 2])
def test_state_round_trip_gives_the_same_scores(num_classes):
    fit, x = all_features(mixture_draw(100, 1), num_classes), all_features(mixture_draw(7, 5) * 1.5, num_classes)
    names = applicable(num_classes)
    assert ("classifier" in names) == (num_classes is not None)
    for name in names:
        detector = DETECTORS[name](D, 11, num_classes).fit(fit)
        state = detector.state()
        assert all(isinstance(v, (str, int, list, torch.Tensor, type(None))) for v in state.values()), "weights-only"
        torch.testing.assert_close(Detector.from_state(state).score(x), detector.score(x))


def test_costs_in_forward_pass_equivalents():
    assert NLLDetector(D).cost(2) == 1.0
    assert DETECTORS["denoise"](D).cost(2) == 6.0  # two levels, one forward + one backward each
    assert DETECTORS["flip"](D).cost(3) == 1 + 3, "the scan and its three mirror images"
    assert DETECTORS["combined"](D).cost(2) == 1 + 6 + 2, "the default stays within 10 forward passes"
    assert DETECTORS["classifier-nll"](D, 8, 10).cost(2) == 1 + 10


def test_combined_is_as_far_out_as_its_most_alarmed_component_on_an_out_of_sample_scale():
    fit, x = all_features(mixture_draw(200, 16)), all_features(mixture_draw(20, 17).flip(-1))
    combined = DETECTORS["combined"](D).fit(fit)
    names, even = ("multiscale", "map", "flip"), torch.arange(200) % 2 == 0
    held_out = torch.empty(200, 3, dtype=torch.float64)
    for side in (even, ~even):  # two-fold cross-fitting: each half scored by components fitted on the other
        part = {k: v[side] for k, v in fit.items()}
        rest = {k: v[~side] for k, v in fit.items()}
        held_out[~side] = torch.stack([DETECTORS[n](D).fit(part).score(rest).double() for n in names], dim=1)
    full = torch.stack([DETECTORS[n](D).fit(fit).score(x).double() for n in names], dim=1)
    torch.testing.assert_close(combined.score(x), ((full - held_out.mean(0)) / held_out.std(0)).amax(1))


def test_unfitted_and_unknown_detectors_fail_clearly():
    with pytest.raises(NotFittedError, match="not fitted"):
        MultiscaleDetector(D).score(profiles(draw(2, S, 0)))
    with pytest.raises(ValueError, match="at least 2"):
        MultiscaleDetector(D).fit(profiles(draw(1, S, 0)))
    with pytest.raises(ValueError, match="unknown detector 'knn'"):
        Detector.from_state({"name": "knn", "num_dims": D, "bit_depth": 8})


def test_drift_sees_a_smooth_intensity_shift_that_the_per_pixel_errors_miss():
    """A small additive shift of every pixel (the smoothest bias field): each pixel's squared residual hardly moves,
    but the denoiser pulls every pixel the same way, which the smoothed signed residual keeps."""
    fit, test_id = all_features(mixture_draw(300, 16)), all_features(mixture_draw(200, 17))
    shifted = all_features(mixture_draw(200, 18) + 0.2)

    def auroc(name: str) -> float:
        detector = DETECTORS[name](D).fit(fit)
        return ood_metrics(detector.score(test_id).numpy(), detector.score(shifted).numpy())["auroc"]

    assert auroc("drift") > 0.9
    assert auroc("drift") > auroc("map") + 0.15


class LevelGapDetector(Detector):
    """A detector defined outside the package: the largest jump of log p_t(x) between neighbouring noise levels."""

    name = "test-level-gap"
    needs = ("profile",)

    def score(self, features):
        profile = features["profile"].double()
        return (profile[:, 1:] - profile[:, :-1]).abs().amax(1)


@pytest.fixture
def registered():
    yield register_detector(LevelGapDetector)
    DETECTORS.pop(LevelGapDetector.name)


def test_a_registered_detector_is_calibrated_and_scores_like_the_built_in_ones(registered, checkpoint):
    from cdm_ood.errors import UsageError
    from cdm_ood.ood import OODDetector

    with pytest.raises(UsageError, match="'nll' is already registered"):
        register_detector(type("Other", (NLLDetector,), {}))
    images = phantom_volume(np.random.default_rng(3), size=16, slices=12)
    fitted = OODDetector.from_checkpoint(checkpoint).fit(images)
    assert "test-level-gap" in fitted.model.calibration.detectors
    mine = OODDetector(fitted.model, "test-level-gap")
    expected = LevelGapDetector(mine.num_dims).score(mine.features(mine.prepare(images), ("profile",)))
    np.testing.assert_allclose(mine.score(images), expected.numpy(), rtol=1e-6)
    assert np.isfinite(mine.threshold) and mine.fpr == 0.05
