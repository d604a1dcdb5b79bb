"""Local defects with known masks (`cdm_ood.data.defects`): deterministic, local, visible, and nothing outside the
mask changes."""

import numpy as np
import pytest

from cdm_ood.data.artifacts import VALUE_RANGE
from cdm_ood.data.defects import DEFECTS, draw_defect
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.errors import UsageError


@pytest.fixture(scope="module", params=["ct", "mr"])
def clean(request) -> tuple[np.ndarray, str]:
    return phantom_volume(np.random.default_rng(7), size=64, slices=6, modality=request.param), request.param


@pytest.mark.parametrize("kind", DEFECTS)
def test_a_defect_is_local_visible_deterministic_and_masked_exactly(clean, kind):
    volume, modality = clean
    corrupted, mask = draw_defect(volume, kind, seed=11, modality=modality)
    again, same_mask = draw_defect(volume, kind, seed=11, modality=modality)
    assert np.array_equal(corrupted, again) and np.array_equal(mask, same_mask)
    _, other_mask = draw_defect(volume, kind, seed=12, modality=modality)
    assert not np.array_equal(mask, other_mask)
    assert mask.shape == volume.shape and mask.dtype == bool and corrupted.dtype == np.float32
    assert np.array_equal(corrupted[~mask], volume[~mask]) and (corrupted[mask] != volume[mask]).all()
    touched = mask.any(axis=(1, 2))
    assert 1 <= touched.sum() <= 3 and np.ptp(np.flatnonzero(touched)) == touched.sum() - 1  # neighbouring slices
    assert mask.reshape(len(mask), -1).mean(axis=1).max() <= 0.05  # local: a few percent of a slice at most
    low, high = VALUE_RANGE[modality]
    assert low <= corrupted.min() and corrupted.max() <= high and np.array_equal(corrupted, np.rint(corrupted))
    lo, hi = np.percentile(volume, [1.0, 99.5])
    assert np.abs(corrupted - volume)[mask].mean() > 0.08 * (hi - lo)  # plain to see, not a whisper


def test_defects_lie_inside_the_body():
    volume = phantom_volume(np.random.default_rng(2), size=32, slices=4, modality="ct")
    for kind in ("metal-streak", "lesion", "foreign-object"):
        for seed in range(4):
            _, mask = draw_defect(volume, kind, seed, "ct")
            rows, cols = np.nonzero(mask.any(axis=0))
            assert volume[:, int(rows.mean()), int(cols.mean())].max() > -500  # the centre is not air


def test_a_tiny_or_flat_volume_still_gets_a_defect_and_bad_arguments_are_named():
    flat = np.full((1, 16, 16), 100.0, dtype=np.float32)
    corrupted, mask = draw_defect(flat, "foreign-object", 0, "ct")
    assert mask.any() and np.array_equal(corrupted[~mask], flat[~mask])
    with pytest.raises(UsageError, match="defect must be one of"):
        draw_defect(flat, "scratch", 0, "ct")
    with pytest.raises(UsageError, match="modality"):
        draw_defect(flat, "lesion", 0, "pet")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        draw_defect(flat[0], "lesion", 0, "ct")
