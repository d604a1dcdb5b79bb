"""Writing derived images (e.g. denoised) in their input's format and geometry, so a viewer or PACS shows them
over the original, each by its format's reader (`FormatReader.write_like`, `suffix`): a DICOM file keeps its tags
and pixel spacing under a new SeriesInstanceUID and SOPInstanceUID (the input's modality LUT inverted, stored
uncompressed), a NIfTI volume keeps its affine and voxel order, a PNG/JPEG becomes a PNG of the input's size.
Slices come in the readers' convention (rows first as displayed; NIfTI slices from the closest canonical
orientation, see `readers`), keyed by (time point, index); slices missing from the mapping keep the input's
values. Files are written atomically and inputs only read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .discovery import detect_reader
from .errors import UnsupportedFormatError
from .formats import SliceKey

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def output_suffix(path: str | Path) -> str:
    """The suffix of a derived file: `.dcm`, `.nii.gz` or `.png` by the input's content (its reader's `suffix`)."""
    reader = detect_reader(path)
    if reader.suffix is None:
        raise UnsupportedFormatError(path, f"not written back: {reader.title} files are not written")
    return reader.suffix


def write_like(source: str | Path, slices: dict[SliceKey, np.ndarray], out: str | Path, series_uid: str) -> None:
    """Write `slices` ((C, H, W) arrays in the input's units and size) as a file like `source` to `out`.
    `series_uid` is the new SeriesInstanceUID of a DICOM output (one per input series)."""
    detect_reader(source).write_like(Path(source), slices, Path(out), series_uid)
