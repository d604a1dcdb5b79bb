"""Orientation and geometry errors applied to the voxel data of a volume `vol[k, row, col]`.

The axes are those of `phantoms.phantom_volume` and of the readers (`iter_slices` gives slice k as `vol[k]`): k is
the superior-inferior axis (axial slices), rows the anterior-posterior axis and columns the left-right axis; NIfTI
written by `volume_files.write_nifti` stores `data[:, :, k] == vol[k].T` with a diagonal affine (RAS+), which the
readers' closest-canonical orientation leaves as it is. A copy written with the clean volume's affine (or DICOM
geometry) still claims the original orientation while its data are wrong: the realistic error of a mis-sorted or
mis-converted series, and the one these functions make.

For axial slices a superior-inferior flip is a reversed slice order, so `si-flip` stands for both; `interleave`
is the other slice-order error: an interleaved acquisition (odd slices, then even) stored in acquisition order.

Coverage errors (`COVERAGE`, `cover`) leave out part of the anatomy that every clean volume shows, each slice
still a plausible slice: `truncated-fov` sets the anterior `MISSING` of the body's anterior-posterior extent to
background (a field of view placed too far back), `partial-slab` drops the superior `MISSING` of the slices,
`early-coverage` keeps the slice count but leaves its superior `MISSING` empty (the acquisition stopped early), and
`slab-position` moves the slab up by `MISSING` of its slices (the inferior anatomy lost, the top empty). Background
is drawn from the volume's own background voxels, so no slice becomes constant.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ORIENTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "si-flip": lambda vol: vol[::-1],  # superior-inferior flip = reversed slice order
    "ap-flip": lambda vol: vol[:, ::-1, :],  # each slice's rows reversed
    "lr-flip": lambda vol: vol[:, :, ::-1],  # each slice's columns reversed (the brain is nearly symmetric)
    "rot90": lambda vol: np.rot90(vol, 1, axes=(1, 2)),  # each slice rotated by 90 degrees counter-clockwise
    "transpose": lambda vol: vol.transpose(0, 2, 1),  # rows and columns of each slice swapped
    "interleave": lambda vol: np.concatenate([vol[0::2], vol[1::2]]),  # slices 0, 2, 4, ..., then 1, 3, 5, ...
}


MISSING = 1.0 / 3.0  # the share of the anatomy a coverage error leaves out
BODY_LEVEL = 0.1  # body: above this fraction of the way from a volume's 1st to its 99.5th percentile


def _background(volume: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """`shape` values drawn from the volume's background voxels (those below `BODY_LEVEL`)."""
    lo, hi = np.percentile(volume, (1.0, 99.5))
    return rng.choice(volume[volume <= lo + BODY_LEVEL * (hi - lo)], size=shape).astype(volume.dtype)


def _truncated_fov(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo, hi = np.percentile(vol, (1.0, 99.5))
    rows = np.flatnonzero((vol > lo + BODY_LEVEL * (hi - lo)).any(axis=(0, 2)))
    cut = rows[-1] + 1 - round(MISSING * (rows[-1] + 1 - rows[0]))  # rows run posterior to anterior
    out = vol.copy()
    out[:, cut:, :] = _background(vol, out[:, cut:, :].shape, rng)
    return out


def _early_coverage(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kept = len(vol) - round(MISSING * len(vol))
    return np.concatenate([vol[:kept], _background(vol, (len(vol) - kept, *vol.shape[1:]), rng)])


def _slab_position(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    moved = round(MISSING * len(vol))
    return np.concatenate([vol[moved:], _background(vol, (moved, *vol.shape[1:]), rng)])


COVERAGE: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "truncated-fov": _truncated_fov,
    "partial-slab": lambda vol, rng: vol[: len(vol) - round(MISSING * len(vol))],  # slices run inferior to superior
    "early-coverage": _early_coverage,
    "slab-position": _slab_position,
}


def cover(volume: np.ndarray, error: str, seed: int) -> np.ndarray:
    """A copy of `volume` (slices, rows, cols) with the coverage `error` of `COVERAGE`; `seed` draws its
    background."""
    if error not in COVERAGE:
        raise ValueError(f"unknown coverage error {error!r}; known: {', '.join(COVERAGE)}")
    if volume.ndim != 3:
        raise ValueError(f"need a volume (slices, rows, cols), got shape {volume.shape}")
    return np.ascontiguousarray(COVERAGE[error](volume, np.random.default_rng(seed)))


def misorient(volume: np.ndarray, error: str) -> np.ndarray:
    """A copy of `volume` (slices, rows, cols) with the orientation or geometry `error` of `ORIENTATIONS`."""
    if error not in ORIENTATIONS:
        raise ValueError(f"unknown orientation error {error!r}; known: {', '.join(ORIENTATIONS)}")
    if volume.ndim != 3:
        raise ValueError(f"need a volume (slices, rows, cols), got shape {volume.shape}")
    return np.ascontiguousarray(ORIENTATIONS[error](volume))
