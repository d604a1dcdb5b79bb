"""Writing derived images (e.g. denoised) in their input's format and geometry, so a viewer or PACS shows them
over the original: a DICOM file keeps its tags and pixel spacing under a new SeriesInstanceUID and
SOPInstanceUID (the input's modality LUT inverted, stored uncompressed), a NIfTI volume keeps its affine and
voxel order, a PNG/JPEG becomes a PNG of the input's size. Slices come in the readers' convention (rows first as
displayed; NIfTI slices from the closest canonical orientation, see `readers`), keyed by (time point, index);
slices missing from the mapping keep the input's values. Files are written atomically and inputs only read."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import atomic_path
from .discovery import detect_format
from .errors import UnsupportedFormatError

SliceKey = tuple[Optional[int], int]  # (time point of a 4D NIfTI or None, slice or frame index)
SUFFIXES = {"dicom": ".dcm", "nifti": ".nii.gz", "image": ".png"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def output_suffix(path: str | Path) -> str:
    """The suffix of a derived file: `.dcm`, `.nii.gz` or `.png` by the input's content."""
    return SUFFIXES[detect_format(path)]


def write_like(source: str | Path, slices: dict[SliceKey, np.ndarray], out: str | Path, series_uid: str) -> None:
    """Write `slices` ((C, H, W) arrays in the input's units and size) as a file like `source` to `out`.
    `series_uid` is the new SeriesInstanceUID of a DICOM output (one per input series)."""
    writer = {"dicom": _write_dicom, "nifti": _write_nifti, "image": _write_png}[detect_format(source)]
    writer(Path(source), slices, Path(out), series_uid)


def _write_dicom(source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
    """The input's dataset with new pixels: stored values = (value - intercept) / slope, in the input's range."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source, force=True)
    stored = ds.pixel_array
    frames = stored.reshape((-1, *stored.shape[-2:])) if ds.get("SamplesPerPixel", 1) == 1 else None
    if frames is None:
        raise UnsupportedFormatError(source, "not written back: only single-sample (grayscale) DICOM images are")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    info = np.iinfo(stored.dtype) if stored.dtype.kind in "iu" else None
    new = frames.copy()
    for (_, index), image in slices.items():
        values = np.rint((image[0] - intercept) / slope) if info else (image[0] - intercept) / slope
        new[index if len(new) > 1 else 0] = np.clip(values, info.min, info.max) if info else values
    ds.set_pixel_data(new.reshape(stored.shape).astype(stored.dtype), ds.PhotometricInterpretation, ds.BitsStored)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} denoised (cdm-ood)".strip()
    with atomic_path(out) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _write_nifti(source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
    write_nifti_like(source, slices, out)


def write_nifti_like(
    source: str | Path, slices: dict[SliceKey, np.ndarray], out: str | Path, background: Optional[float] = None
) -> None:
    """Write `slices` ((1, H, W) arrays in the readers' orientation, keyed by (time point, index)) as a float32
    NIfTI file `out` of the NIfTI `source`'s shape, voxel order, affine and header: the slices are put back into
    the closest canonical array, then into the input's voxel order. Voxels of missing slices keep the input's
    values, or are `background` when it is given (the input's voxels are then never read)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    image = nib.load(str(source))
    to_canonical = ornt_transform(io_orientation(image.affine), axcodes2ornt(("R", "A", "S")))
    if background is None:
        canonical = np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float32).copy()
    else:
        shape = image.shape if len(image.shape) > 2 else (*image.shape, 1)
        canonical = apply_orientation(np.full(shape, background, dtype=np.float32), to_canonical).copy()
    if canonical.ndim == 2:
        canonical = canonical[:, :, None]
    for (time_point, index), values in slices.items():
        target = canonical[:, :, index] if time_point is None else canonical[:, :, index, time_point]
        target[...] = values[0].T
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(image.affine))
    data = apply_orientation(canonical, back).reshape(image.shape)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    kind = nib.Nifti2Image if isinstance(image, nib.Nifti2Image) else nib.Nifti1Image
    with atomic_path(out) as tmp:
        tmp.write_bytes(gzip.compress(kind(data, image.affine, header).to_bytes()))


def _write_png(source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
    """8-bit PNG (16-bit when the input is 16-bit), grayscale or RGB like the model's channels."""
    from PIL import Image

    ((_, image),) = slices.items()
    deep = Image.open(source).mode in ("I", "I;16", "I;16B")
    pixels = np.clip(np.rint(image), 0, 65535 if deep else 255).astype(np.uint16 if deep else np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
