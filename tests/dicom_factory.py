"""Real DICOM files for tests, written with pydicom (no mocks)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-123-45-6789"
BIRTH_DATE = "19700101"


def ct_dataset(
    pixels: np.ndarray,
    *,
    series_uid: Optional[str] = None,
    z: float = 0.0,
    instance: int = 1,
    intercept: float = -1024.0,
) -> Dataset:
    """A CT image dataset holding int16 `pixels` of shape (rows, cols), (frames, rows, cols) or (rows, cols, 3)."""
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = pixels.astype(np.int16).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def write(ds: Dataset, path: Path, *, compress_rle: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress_rle:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_ls_claim(path: Path, rows: int = 8, cols: int = 8) -> Path:
    """A file that declares JPEG-LS Lossless with an encapsulated frame: decodable only with a JPEG-LS handler."""
    ds = ct_dataset(np.zeros((rows, cols), np.int16))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return write(ds, path)


def twelve_bit_ct(stored: np.ndarray) -> Dataset:
    """A CT slice of 12-bit unsigned stored values (BitsStored 12, HU = stored - 1024), as scanners write them."""
    ds = ct_dataset(stored.astype(np.int16), intercept=-1024.0)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


# Encoders of the JPEG family (libjpeg-turbo 3, CharLS and OpenJPEG in imagecodecs): 12-bit samples, one frame.
JPEG_ENCODERS = {
    JPEGLosslessSV1: lambda a: imagecodecs.jpeg8_encode(a, bitspersample=12, lossless=True, predictor=1),
    JPEGLossless: lambda a: imagecodecs.jpeg8_encode(a, bitspersample=12, lossless=True, predictor=6),
    JPEGExtended12Bit: lambda a: imagecodecs.jpeg8_encode(a, level=95, bitspersample=12),
    JPEGLSLossless: lambda a: imagecodecs.jpegls_encode(a, level=0),
    JPEG2000Lossless: lambda a: imagecodecs.jpeg2k_encode(a, level=0, codecformat="J2K", bitspersample=12,
                                                          reversible=True),
}  # fmt: skip


def compressed(ds: Dataset, syntax: str) -> Dataset:
    """A copy of `ds` as a new instance of a new series, its pixels encoded in `syntax` (RLE Lossless by pydicom,
    the JPEG family by `JPEG_ENCODERS`), as a PACS exports it."""
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID = generate_uid()
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if syntax == RLELossless:
        out.compress(RLELossless)
        return out
    out.PixelData = encapsulate([JPEG_ENCODERS[syntax](ds.pixel_array)])
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = syntax
    if syntax == JPEGExtended12Bit:
        out.LossyImageCompression = "01"
    return out
