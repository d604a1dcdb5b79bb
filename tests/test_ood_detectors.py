"""OOD features and detectors against closed forms: exact Gaussian / Gaussian-mixture classifiers (math sheet)."""

import math
import re

import numpy as np
import pytest
import torch
from closed_form import ConditionalMixture, GaussianMixture

from cdm_ood import NoiseSchedule, log_likelihood_profile
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.ood import Detector, MultiscaleDetector, NLLDetector, NotFittedError, register_detector
from cdm_ood.ood.detectors import DETECTORS, applicable, required_features, smoothed
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


NAMES = ("nll", "multiscale", "denoise", "flip", "classifier", "combined", "map", "classifier-nll", "drift",
         "combined-drift")  # fmt: skip
FITTED = ("multiscale", "denoise", "flip", "map", "drift")  # the detectors with parameters of their own


def synthetic(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Features of `n` images with small spreads (every deviation below 1): a 6-level profile whose column 2 is the
    same in every image, two-level residuals (float32, as computed) that are 0 at pixel (0, 0), two flips, three
    class log-likelihoods."""
    g = torch.Generator().manual_seed(seed)
    profile = -40.0 * D + 0.3 * D * torch.randn(n, 6, dtype=torch.float64, generator=g)
    profile[:, 2] = -2.0 * D
    residuals = 0.3 * torch.randn(n, 2, 1, 3, 4, generator=g)
    residuals[..., 0, 0] = 0.0
    flips = profile[:, :1] - D * (0.05 + 0.1 * torch.rand(n, 2, dtype=torch.float64, generator=g))
    class_ll = -40.0 * D + 2.0 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    return {"profile": profile, "residuals": residuals, "flips": flips, "class_ll": class_ll}


def reference_smoothing(maps: np.ndarray, width: float) -> np.ndarray:
    """Maps (B, *spatial) convolved along each spatial axis with the erf-interpolated Gaussian of `width` pixels,
    0.5 (erf((x + 1/2) / (w sqrt 2)) - erf((x - 1/2) / (w sqrt 2))) for |x| <= round(4 w), edges replicated."""
    from scipy.special import erf

    tail = int(4 * width + 0.5)
    x = np.arange(-tail, tail + 1)
    kernel = 0.5 * (erf((x + 0.5) / (width * 2**0.5)) - erf((x - 0.5) / (width * 2**0.5)))
    out = maps.astype(np.float64)
    for axis in range(1, maps.ndim):
        padded = np.pad(out, [(tail, tail) if a == axis else (0, 0) for a in range(maps.ndim)], mode="edge")
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out


def test_nll_reads_log_p0_in_bits_per_dim_at_the_detectors_bit_depth():
    profile = torch.tensor([[-300.0, -1.0, 5.0], [-10.0, 2.0, 3.0]], dtype=torch.float64)
    expected = -profile[:, 0] / (D * math.log(2)) + 10  # 11-bit data: log2(2^11 / 2) = 10 bits of offset
    assert torch.equal(NLLDetector(D, 11).score({"profile": profile}), expected)


def test_every_detector_keeps_its_dims_bit_depth_and_classes_through_its_state():
    """The state names the detector, its dims, bit depth and classes (and those of a combination's parts); the
    detector rebuilt from it has them and scores bit for bit the same. Built without them: 8 bits, no classes."""
    fit, x = synthetic(6, 0), synthetic(5, 1)
    for name in NAMES:
        assert (DETECTORS[name](D).bit_depth, DETECTORS[name](D).num_classes) == (8, None), name
        detector = DETECTORS[name](D, 11, 3).fit(fit)
        state = detector.state()
        assert {k: state[k] for k in ("name", "num_dims", "bit_depth", "num_classes")} == {
            "name": name, "num_dims": D, "bit_depth": 11, "num_classes": 3}, name  # fmt: skip
        for part, component in zip(state.get("parts", ()), getattr(detector, "components", ()), strict=True):
            assert (part["name"], part["num_dims"], part["bit_depth"], part["num_classes"]) == (
                component.name, D, 11, 3)  # fmt: skip
        restored = Detector.from_state(state)
        assert (type(restored), restored.num_dims, restored.bit_depth, restored.num_classes) == (
            type(detector), D, 11, 3)  # fmt: skip
        assert torch.equal(restored.score(x), detector.score(x)), name


def test_which_detectors_apply_with_and_without_classes():
    assert applicable(None) == ["nll", "multiscale", "denoise", "flip", "combined", "map", "drift", "combined-drift"]
    assert applicable(2) == list(NAMES)
    assert required_features(["combined-drift", "classifier-nll"], 2) == ("profile", "residuals", "flips", "class_ll")


class ClassAwareDetector(Detector):
    """Reads the class log-likelihoods only when the model has classes."""

    name = "test-class-aware"

    def required(self):
        return ("profile", "class_ll") if self.num_classes else ("profile",)


def test_required_features_asks_each_detector_built_for_the_models_classes():
    register_detector(ClassAwareDetector)
    try:
        assert required_features(["test-class-aware"], 4) == ("profile", "class_ll")
        assert required_features(["test-class-aware"], None) == ("profile",)
    finally:
        DETECTORS.pop(ClassAwareDetector.name)


def test_unknown_unfitted_and_underfed_detectors_say_what_is_wrong():
    unknown = f"unknown detector 'knn'; expected one of {sorted(NAMES)}"
    with pytest.raises(ValueError, match=f"^{re.escape(unknown)}$"):
        Detector.from_state({"name": "knn", "num_dims": D, "bit_depth": 8})
    one, two = synthetic(1, 0), synthetic(2, 1)
    for name in FITTED:
        with pytest.raises(ValueError, match=f"^the {name} detector needs at least 2 in-distribution images, got 1$"):
            DETECTORS[name](D).fit(one)
        assert DETECTORS[name](D).fit(two).score(two).shape == (2,), "two images are enough"
    for name in (*FITTED, "combined", "classifier-nll", "combined-drift"):
        detector = DETECTORS[name](D)
        unfitted = f"^the {name} detector is not fitted: "
        with pytest.raises(NotFittedError, match=unfitted + "calibrate it on in-distribution data$"):
            detector.score(two)
        saving = "calibrate it on in-distribution data$" if name in ("multiscale", "denoise") else "nothing to save$"
        with pytest.raises(NotFittedError, match=unfitted + saving):
            detector.state()
        if name in ("map", "drift"):
            with pytest.raises(NotFittedError, match=unfitted + "calibrate it on in-distribution data$"):
                detector.maps(two)


def mahalanobis(fit: np.ndarray, new: np.ndarray) -> np.ndarray:
    """z P z^T with z standardised by the fitted mean and deviation (at least 1e-12) and P sklearn's Ledoit-Wolf
    precision of the fitted z."""
    from sklearn.covariance import LedoitWolf

    mean, scale = fit.mean(0), np.maximum(fit.std(0, ddof=1), 1e-12)
    precision = LedoitWolf().fit((fit - mean) / scale).precision_
    z = (new - mean) / scale
    return np.einsum("bi,ij,bj->b", z, precision, z)


def test_multiscale_and_denoise_are_mahalanobis_distances_of_their_closed_form_vectors():
    """multiscale: the profile per dimension at `levels` evenly spaced columns (all 6 here), one of them the same in
    every fitted image (its deviation floored at 1e-12, so a departure of 1e-12 is one deviation); denoise: the log
    of each level's mean squared residual, floored at 1e-30 (an image denoised perfectly)."""
    fit, new = synthetic(8, 2), synthetic(3, 3)
    new["profile"][0, 2] += 1e-12 * D
    new["residuals"][1] = 0.0
    expected = mahalanobis(fit["profile"].numpy() / D, new["profile"].numpy() / D)
    np.testing.assert_allclose(MultiscaleDetector(D).fit(fit).score(new).numpy(), expected, rtol=1e-9)

    def log_errors(f: dict) -> np.ndarray:
        squares = f["residuals"].double().numpy().reshape(len(f["residuals"]), 2, -1) ** 2
        return np.log(np.maximum(squares.mean(2), 1e-30))

    denoise = DETECTORS["denoise"](D).fit(fit)
    np.testing.assert_allclose(denoise.score(new).numpy(), mahalanobis(log_errors(fit), log_errors(new)), rtol=1e-9)
    assert denoise.state()["mean"] == pytest.approx(log_errors(fit).mean(0).tolist(), rel=1e-12)


def test_multiscale_reads_16_evenly_spaced_profile_columns_each_once():
    """round(i (L - 1) / 15) for i = 0..15 of a profile with L = T + 2 columns; every column when L is below 16."""
    detector = MultiscaleDetector(D)
    assert detector.columns(202) == [0, 13, 27, 40, 54, 67, 80, 94, 107, 121, 134, 147, 161, 174, 188, 201]
    assert detector.columns(6) == [0, 1, 2, 3, 4, 5]
    profile = torch.arange(2 * 202, dtype=torch.float64).reshape(2, 202)
    assert torch.equal(detector.vector({"profile": profile}), profile[:, detector.columns(202)] / D)


def test_flip_scores_minus_the_smallest_standardised_mirror_ratio():
    fit, new = synthetic(7, 4), synthetic(3, 5)
    ratios = [((f["profile"][:, :1] - f["flips"]) / D).numpy() for f in (fit, new)]
    mean, scale = ratios[0].mean(0), ratios[0].std(0, ddof=1)
    flip = DETECTORS["flip"](D).fit(fit)
    np.testing.assert_allclose(flip.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(flip.scale.numpy(), scale, rtol=1e-12)
    np.testing.assert_allclose(flip.score(new).numpy(), -((ratios[1] - mean) / scale).min(1), rtol=1e-12)


def test_map_detector_maps_scores_and_localisation_maps_in_closed_form():
    """The per-pixel statistic log(1 + r^2), standardised by each pixel's fitted mean and deviation (n - 1, floored
    at 1e-6: pixel (0, 0) never varies); its root mean square over levels and channels is the detection map and
    the 0.99 quantile of the map the score (an empty batch: no scores); the localisation map divides by the root
    mean of each level's squared deviations instead and is smoothed (`reference_smoothing`)."""
    fit, new = synthetic(6, 6), synthetic(3, 7)
    new["residuals"][:, :, :, 0, 0] = 1e-3
    stat = [np.log1p(f["residuals"].double().numpy() ** 2) for f in (fit, new)]
    mean, std = stat[0].mean(0), np.maximum(stat[0].std(0, ddof=1), 1e-6)
    detector = DETECTORS["map"](D).fit(fit)
    np.testing.assert_allclose(detector.std.numpy(), std, rtol=1e-4)
    maps = np.sqrt((((stat[1] - mean) / std) ** 2).mean((1, 2)))
    np.testing.assert_allclose(detector.maps(new).numpy(), maps, rtol=1e-4)
    np.testing.assert_allclose(detector.score(new).numpy(), np.quantile(maps.reshape(3, -1), 0.99, axis=1), rtol=1e-4)
    assert detector.score({"residuals": new["residuals"][:0]}).shape == (0,)
    pooled = np.sqrt((std**2).mean((2, 3), keepdims=True))
    local = np.sqrt((((stat[1] - mean) / pooled) ** 2).mean((1, 2)))
    np.testing.assert_allclose(detector.anomaly_maps(new, 0.0).numpy(), local, rtol=1e-4)
    np.testing.assert_allclose(detector.anomaly_maps(new).numpy(), reference_smoothing(local, 1.5), rtol=1e-4)
    np.testing.assert_allclose(detector.anomaly_maps(new, 0.7).numpy(), reference_smoothing(local, 0.7), rtol=1e-4)


def test_drift_statistic_is_each_levels_and_channels_residual_smoothed_on_its_own():
    residuals = torch.randn(3, 2, 2, 9, 7, generator=torch.Generator().manual_seed(8))
    expected = reference_smoothing(residuals.flatten(0, 2).numpy(), 1.5).reshape(residuals.shape)
    np.testing.assert_allclose(DETECTORS["drift"](D).statistic({"residuals": residuals}).numpy(), expected, atol=1e-6)


def test_smoothing_is_the_erf_gaussian_truncated_at_four_widths():
    """An impulse becomes the outer product of the kernel, exactly 0 beyond round(4 w) pixels; a constant map stays
    constant up to the kernel's mass (edges replicated)."""
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    out = smoothed(impulse, 1.5)[0]
    np.testing.assert_allclose(out.numpy(), reference_smoothing(impulse.numpy(), 1.5)[0], atol=1e-8)
    assert out[10, 16] > 0 and out[10, 17] == 0 and out[16, 16] > 0 and out[3, 10] == 0
    flat = smoothed(torch.ones(1, 5, 6), 1.5)
    np.testing.assert_allclose(flat.numpy(), reference_smoothing(np.ones((1, 5, 6)), 1.5), rtol=1e-6)
    assert flat.std() < 1e-6


@pytest.mark.parametrize(("name", "n"), [("combined", 3), ("combined", 4), ("combined", 5), ("classifier-nll", 6)])
def test_a_combination_standardises_by_held_out_scores_from_four_images_on(name, n):
    """From 4 images on, each component's scale is the mean and deviation of its scores on the images of one parity
    by the component fitted on the others (an odd count too); below 4, of its in-sample scores. The score is the
    largest standardised component score, the components fitted on all images."""
    fit, x = synthetic(n, 9), synthetic(4, 10)
    combination = DETECTORS[name](D).fit(fit)
    components = [c.name for c in DETECTORS[name].components]
    even = torch.arange(n) % 2 == 0
    scores = torch.empty(n, len(components), dtype=torch.float64)
    for side in (even, ~even) if n >= 4 else ():
        part, rest = ({k: v[rows] for k, v in fit.items()} for rows in (side, ~side))
        scores[~side] = torch.stack([DETECTORS[c](D).fit(part).score(rest).double() for c in components], dim=1)
    if n < 4:
        scores = torch.stack([DETECTORS[c](D).fit(fit).score(fit).double() for c in components], dim=1)
    torch.testing.assert_close(combination.mean, scores.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(combination.scale, scores.std(0), rtol=1e-12, atol=0)
    assert name != "classifier-nll" or combination.scale[1] < 1, "a probability's deviation: the floor at 1e-12 acts"
    full = torch.stack([DETECTORS[c](D).fit(fit).score(x).double() for c in components], dim=1)
    expected = ((full - scores.mean(0)) / scores.std(0)).amax(1)
    torch.testing.assert_close(combination.score(x), expected, rtol=1e-12, atol=0)
