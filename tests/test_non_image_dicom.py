"""DICOM objects that are not images (segmentations, RT objects, presentation states, reports, documents) are
reported as not images by their SOP class, also when they carry pixel data, and never scored."""

import json
from pathlib import Path

import numpy as np
import pytest
from processes import cdm
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    generate_uid,
)

from cdm_ood.data import NotAnImageError, discover
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series


def pixel_module(ds: Dataset, pixels: np.ndarray, bits: int) -> None:
    """(frames, rows, cols) `pixels` as a multi-frame pixel module; 1-bit pixels are packed as DICOM packs them."""
    frames, ds.Rows, ds.Columns = pixels.shape
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    flat = pixels.astype(np.uint8).ravel()
    ds.PixelData = np.packbits(flat, bitorder="little").tobytes() if bits == 1 else pixels.astype("<u2").tobytes()


def write_object(path: Path, sop_class: str, modality: str, **fields) -> Path:
    """A minimal DICOM object of `sop_class` (with file meta), plus `fields`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), modality
    for key, value in fields.items():
        setattr(ds, key, value)
    if modality == "SEG":  # a 1-bit, 3-frame binary mask
        pixel_module(ds, np.random.default_rng(0).random((3, 16, 16)) > 0.5, bits=1)
        ds.SegmentationType = "BINARY"
    if modality == "RTDOSE":  # a dose grid of 2 frames
        pixel_module(ds, np.arange(2 * 16 * 16).reshape(2, 16, 16), bits=16)
    ds.save_as(path, enforce_file_format=True)
    return path


NON_IMAGES = {
    "seg.dcm": (SegmentationStorage, "SEG", "Segmentation Storage"),
    "rtdose.dcm": (RTDoseStorage, "RTDOSE", "RT Dose Storage"),
    "rtstruct.dcm": (RTStructureSetStorage, "RTSTRUCT", "RT Structure Set Storage"),
    "gsps.dcm": (GrayscaleSoftcopyPresentationStateStorage, "PR", "Grayscale Softcopy Presentation State Storage"),
    "sr.dcm": (ComprehensiveSRStorage, "SR", "Comprehensive SR Storage"),
    "report.dcm": (EncapsulatedPDFStorage, "DOC", "Encapsulated PDF Storage"),
}


@pytest.fixture
def archive(tmp_path) -> Path:
    """One real CT series and every kind of non-image object, in one folder."""
    folder = tmp_path / "archive"
    write_dicom_series(phantom_volume(np.random.default_rng(5), size=16, slices=2), folder / "ct", modality="ct",
                       volume_index=0)  # fmt: skip
    for name, (sop_class, modality, _) in NON_IMAGES.items():
        extra = {"MIMETypeOfEncapsulatedDocument": "application/pdf",
                 "EncapsulatedDocument": b"%PDF-1.4\n%%EOF\n"} if modality == "DOC" else {}  # fmt: skip
        write_object(folder / name, sop_class, modality, **extra)
    return folder


def test_non_image_objects_are_not_images_by_sop_class(archive):
    errors = []
    sources = discover(archive, on_error=errors.append)
    assert {Path(s.path).parent.name for s in sources} == {"ct"}
    by_name = {Path(e.path).name: e for e in errors}
    assert set(by_name) == set(NON_IMAGES)
    for name, (sop_class, _, class_name) in NON_IMAGES.items():
        assert isinstance(by_name[name], NotAnImageError), name
        assert class_name in by_name[name].reason and sop_class in by_name[name].reason


def test_score_never_scores_non_image_objects(checkpoint, archive, tmp_path):
    out = cdm("score", archive, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.json",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1, out.stderr  # the unreadable files fail the gate; the CT series itself passes
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    scored = {Path(r["path"]).parent.name for r in rows if r["level"] == "slice"}
    assert scored == {"ct"} and [r["verdict"] for r in rows if r["level"] == "volume"] == ["in"]
    files = {Path(r["path"]).name: r for r in rows if r["level"] == "file"}
    assert set(files) == set(NON_IMAGES)
    for name, (_, _, class_name) in NON_IMAGES.items():
        assert files[name]["verdict"] == "unreadable" and files[name]["score"] is None
        assert files[name]["reason"].startswith("NotAnImageError: ") and class_name in files[name]["reason"]
