"""Volumes written as files, storing exactly their numbers: a DICOM series (`write_dicom_series`, one file per
slice, slice k's pixel array `vol[k]`) or a gzipped NIfTI-1 file (`write_nifti`, `data[:, :, k] == vol[k].T`);
each file written atomically. pydicom and nibabel are imported inside the functions that need them."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..utils.io import atomic_path
from .artifacts import check_modality


def _integer_pixels(image: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    """`image` as little-endian `dtype`, refusing values that would not be stored exactly."""
    info = np.iinfo(dtype)
    if not np.array_equal(image, np.rint(image)) or image.min() < info.min or image.max() > info.max:
        raise ValueError(f"pixel values must be integers in [{info.min}, {info.max}] to be stored as {dtype.__name__}")
    return image.astype(np.dtype(dtype).newbyteorder("<"))


def write_dicom_series(
    volume: np.ndarray,
    folder: str | Path,
    *,
    modality: str,
    volume_index: int,
    spacing: float = 1.0,
    study_uid: Optional[str] = None,
    series_number: int = 1,
    description: str = "cdm-ood phantom",
    series_uid: Optional[str] = None,
    fields: Optional[Mapping[str, Any]] = None,
    stem: str = "slice",
) -> str:
    """Write `volume` as a series of single-frame DICOM files `folder/slice_000.dcm`, ...; returns its
    SeriesInstanceUID.

    CT is stored as signed int16 HU (slope 1, intercept 0), MR as uint16. Pass the same `study_uid` to put
    several series in one study (one is generated otherwise), the same `series_uid` to add files to a series (e.g.
    its second echo: `fields={"EchoNumbers": 2}`, set on every file after the defaults, and another file `stem`).
    The patient is the fake "PHANTOM^<volume_index>".
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        generate_uid,
    )

    check_modality(modality)
    pixels = _integer_pixels(volume, np.int16 if modality == "ct" else np.uint16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])  # shared by the study's series
    series_uid = series_uid or generate_uid()
    sop_class = CTImageStorage if modality == "ct" else MRImageStorage
    width = max(3, len(str(len(pixels) - 1)))
    for k, image in enumerate(pixels):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Modality = modality.upper()
        ds.Manufacturer = "cdm-ood"
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.PatientName = f"PHANTOM^{volume_index}"
        ds.PatientID = f"PHANTOM-{volume_index}"
        ds.PatientBirthDate = ""
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = spacing
        ds.SliceLocation = k * spacing
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        if modality == "ct":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.KVP = ""
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
            ds.ScanOptions = ds.EchoTime = ds.EchoTrainLength = ""
        ds.PixelData = image.tobytes()
        for keyword, value in (fields or {}).items():
            setattr(ds, keyword, value)
        with atomic_path(folder / f"{stem}_{k:0{width}d}.dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return series_uid


def write_nifti(
    volume: np.ndarray,
    path: str | Path,
    *,
    spacing: float = 1.0,
    affine: Optional[np.ndarray] = None,
    dtype: type[np.generic] = np.float32,
) -> None:
    """Write `volume` to a gzipped NIfTI-1 file as `dtype` (float32 by default) `data = vol.transpose(2, 1, 0)`
    with `affine` (voxel -> RAS mm; by default diag(spacing, spacing, spacing, 1)). The gzip header carries no
    timestamp, so equal volumes give equal files."""
    import nibabel as nib

    affine = np.diag([spacing, spacing, spacing, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(volume, dtype=dtype).transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
