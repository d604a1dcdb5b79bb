"""The slices of an image loaded by MONAI (`LoadImage` + `EnsureChannelFirst`, any `Orientation` after them), in
the orientation of cdm-ood's own readers, so that both give the same pixels in the same order.

MONAI keeps its readers' layout (C, x, y[, z]): the first spatial axis runs along a row (the columns), and the
volume's `affine` says where each axis points. cdm-ood's readers give rows first as displayed: a DICOM frame,
PNG or JPEG as stored (Rows, Columns), DICOM slices in their series order; a NIfTI, NRRD or MetaImage volume
turned to its closest canonical (RAS) orientation, slice k being `data[:, :, k].T`. `reader_slices` puts the
volume back in that orientation with its affine (whatever `Orientation` did) and cuts those slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from torch import Tensor

from .discovery import detect_reader
from .errors import DataError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_loaded_image(image: Any) -> bool:
    """Whether `image` is a MetaTensor from MONAI `LoadImage`: it knows its file and affines."""
    meta = getattr(image, "meta", None) or {}
    return all(k in meta for k in ("affine", "original_affine", "filename_or_obj"))


def reader_slices(image: Any) -> np.ndarray:
    """The slices (D, C, H, W) that `iter_slices` reads from the file `image` was loaded from, in the same order
    and orientation: `image` is MONAI's channel-first (C, x, y) or (C, x, y, z) MetaTensor (`is_loaded_image`),
    after any reorientation. A 2D image gives one slice."""
    if not is_loaded_image(image):
        raise ValueError("reader_slices needs the MetaTensor of MONAI LoadImage (with its affine and file name)")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a channel-first 2D or 3D image, got shape {tuple(array.shape)}")
    array = array if array.ndim == 4 else array[..., None]
    affine, original = (_ras_affine(image.meta, key) for key in ("affine", "original_affine"))
    canonical = _canonical(image.meta["filename_or_obj"])
    target = axcodes2ornt("RAS") if canonical else io_orientation(original)  # the readers' orientation
    spatial = np.moveaxis(array, 0, -1)  # (x, y, z, C): nibabel reorients the leading axes
    spatial = apply_orientation(spatial, ornt_transform(io_orientation(affine), target))
    return np.ascontiguousarray(spatial.transpose(2, 3, 1, 0))  # slice k = data[:, :, k].T, channels first


def _ras_affine(meta: dict, key: str) -> np.ndarray:
    """The 4x4 affine `meta[key]` in RAS space (a 2D image's 3x3 affine gets a z axis)."""
    affine = np.asarray(meta[key], dtype=np.float64)
    if affine.shape == (3, 3):
        affine = np.insert(np.insert(affine, 2, 0.0, axis=0), 2, 0.0, axis=1)
        affine[2, 2] = 1.0
    space = str(meta.get("space", "RAS"))
    return _LPS_TO_RAS @ affine if space.endswith("LPS") else affine


def _canonical(filename: Any) -> bool:
    """Whether cdm-ood's reader of the loaded file gives the slices of its closest canonical (RAS) volume
    (`FormatReader.canonical`); not for a folder (a DICOM series) or a file whose format cannot be told."""
    path = Path(str(filename[0] if isinstance(filename, (list, tuple)) else filename))
    if path.is_dir():
        return False
    try:
        return detect_reader(path).canonical
    except DataError:
        return False
