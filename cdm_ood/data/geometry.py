"""Orientation and geometry errors applied to the voxel data of a volume `vol[k, row, col]`.

The axes are those of `phantoms.phantom_volume` and of the readers (`iter_slices` gives slice k as `vol[k]`): k is
the superior-inferior axis (axial slices), rows the anterior-posterior axis and columns the left-right axis; NIfTI
written by `phantoms.write_nifti` stores `data[:, :, k] == vol[k].T` with a diagonal affine (RAS+), which the
readers' closest-canonical orientation leaves as it is. A copy written with the clean volume's affine (or DICOM
geometry) still claims the original orientation while its data are wrong: the realistic error of a mis-sorted or
mis-converted series, and the one these functions make.

For axial slices a superior-inferior flip is a reversed slice order, so `si-flip` stands for both; `interleave`
is the other slice-order error: an interleaved acquisition (odd slices, then even) stored in acquisition order.
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


def misorient(volume: np.ndarray, error: str) -> np.ndarray:
    """A copy of `volume` (slices, rows, cols) with the orientation or geometry `error` of `ORIENTATIONS`."""
    if error not in ORIENTATIONS:
        raise ValueError(f"unknown orientation error {error!r}; known: {', '.join(ORIENTATIONS)}")
    if volume.ndim != 3:
        raise ValueError(f"need a volume (slices, rows, cols), got shape {volume.shape}")
    return np.ascontiguousarray(ORIENTATIONS[error](volume))
