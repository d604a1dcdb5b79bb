import numpy as np
import pytest

from cdm_ood.data.presets import IntensityPreset, ct_preset, fit_mr_preset, make_preset, minmax_preset, uint8_preset


def test_ct_window_maps_hounsfield_units_to_unit_interval_with_clipping():
    t = ct_preset((-1000, 1000)).transform()
    hu = np.array([[[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]]], np.float32)
    np.testing.assert_allclose(np.asarray(t(hu)), [[[-1, -1, 0, 0.5, 1, 1]]], atol=1e-6)


def test_uint8_maps_0_255():
    t = uint8_preset().transform()
    np.testing.assert_allclose(np.asarray(t(np.array([[[0.0, 127.5, 255.0]]]))), [[[-1, 0, 1]]], atol=1e-6)


def test_fixed_presets_keep_intensity_shifts_minmax_erases_them():
    """A brighter scan must look brighter after a fixed preset; per-image min-max hides the shift."""
    img = np.linspace(0, 100, 16, dtype=np.float32).reshape(1, 4, 4)
    fixed = make_preset("ct", window=(-200, 400)).transform()
    per_image = minmax_preset().transform()
    assert not np.allclose(np.asarray(fixed(img)), np.asarray(fixed(img + 50)))
    np.testing.assert_allclose(np.asarray(per_image(img)), np.asarray(per_image(img + 50)), atol=1e-6)


def test_mr_preset_is_fitted_on_the_pooled_training_set_and_stored():
    rng = np.random.default_rng(0)
    images = [rng.gamma(2.0, 100.0, (1, 32, 32)).astype(np.float32) for _ in range(20)]
    preset = fit_mr_preset(images, percentiles=(1, 99))
    pooled = np.concatenate([i.ravel() for i in images])
    np.testing.assert_allclose([preset.a_min, preset.a_max], np.percentile(pooled, [1, 99]), rtol=1e-6)
    assert IntensityPreset.from_dict(preset.to_dict()) == preset
    sub = fit_mr_preset(images, percentiles=(1, 99), max_values=5000)
    np.testing.assert_allclose([sub.a_min, sub.a_max], [preset.a_min, preset.a_max], rtol=0.15)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: IntensityPreset("gamma", 0, 1), "unknown intensity preset"),
        (lambda: IntensityPreset("ct", 5, 5), "a_min < a_max"),
        (lambda: IntensityPreset("minmax", 0, 1), "takes no range"),
        (lambda: make_preset("mr"), "fitted on the training images"),
        (lambda: fit_mr_preset([np.ones((1, 4, 4))]), "constant"),
    ],
)
def test_invalid_presets(call, match):
    with pytest.raises(ValueError, match=match):
        call()
