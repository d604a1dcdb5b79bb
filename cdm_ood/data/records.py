"""What discovery finds (files) and the readers yield (2D slices, and whole volumes stacked from them), with their
provenance (never patient identifiers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

FLAG_NONFINITE = "nan-or-inf"
FLAG_CONSTANT = "constant"
PIXEL_FLAGS = (FLAG_NONFINITE, FLAG_CONSTANT)  # any other flag is a header problem, a sentence naming its field


@dataclass(frozen=True)
class SourceFile:
    """One readable input file, found by `discover`: its format (the name of its reader, `formats.READERS`) and
    the volume it belongs to.

    `index` is the slice's rank in its DICOM series (None for files holding whole volumes); `companions` are
    files read together with this one (the .img of a NIfTI .hdr/.img pair); `flags` are its header's problems
    (`headers`), which every slice read from it carries; `part` says how its DICOM series was split into volumes
    (`series`; "" when it was not).
    """

    path: str
    format: str
    volume_id: str
    index: Optional[int] = None
    sop_instance_uid: Optional[str] = None
    companions: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    part: str = ""


@dataclass(frozen=True)
class SliceSource:
    """Where a slice came from.

    Attributes:
        path: the file the pixels were read from.
        index: position of the slice in its volume or series (0-based, sorted by patient position for DICOM
            series, by the third voxel axis for NIfTI volumes, the frame number for multi-frame DICOM).
        volume_id: SeriesInstanceUID for DICOM (with the part's label when the series was split: `series`), the
            file path for NIfTI and 2D images. Splits and per-volume verdicts group by it.
        sop_instance_uid: the DICOM SOPInstanceUID where present.
        frame: the frame of a multi-frame DICOM file, else None.
        time_point: the volume of a 4D NIfTI file, else None.
        part: how its DICOM series was split into volumes ("" when it was not).
    """

    path: str
    index: int
    volume_id: str
    sop_instance_uid: Optional[str] = None
    frame: Optional[int] = None
    time_point: Optional[int] = None
    part: str = ""


@dataclass
class Slice:
    """A 2D image as float32 (C, H, W) in the file's own intensity units (DICOM after its modality LUT, e.g. HU),
    rows first as displayed, plus its source and flags: its pixels' (`nan-or-inf`, `constant`) and its header's
    (`cdm_ood.data.headers`: a sentence naming the field, e.g. a SOPInstanceUID its series holds twice). A slice
    with any flag is never scored."""

    image: np.ndarray
    source: SliceSource
    flags: tuple[str, ...] = field(default=())


@dataclass
class Volume:
    """A whole volume as float32 (C, D, H, W): the slices of one volume id (and time point) in index order, in the
    file's own units; its source has the volume's path (a DICOM series: its folder), index 0 and no SOPInstanceUID.
    Its flags are its slices' header flags and those of all its voxels (`quality_flags`): any NaN/inf, or constant
    overall."""

    image: np.ndarray
    source: SliceSource
    flags: tuple[str, ...] = field(default=())


def quality_flags(image: np.ndarray) -> tuple[str, ...]:
    """Flags for pixels that can be read but must not be scored as if they were normal images."""
    finite = np.isfinite(image)
    if not finite.all():
        return (FLAG_NONFINITE,)
    if image.size == 0 or image.min() == image.max():
        return (FLAG_CONSTANT,)
    return ()


def describe_flags(flags: Sequence[str]) -> str:
    """Why an image with `flags` is not scored: its header problems, then its pixels' flags ('nan-or-inf pixels')."""
    pixels = [f for f in flags if f in PIXEL_FLAGS]
    return "; ".join([*header_flags(flags), *([f"{', '.join(pixels)} pixels"] if pixels else [])])


def header_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """The header problems among `flags` (those that are not pixel flags)."""
    return tuple(f for f in flags if f not in PIXEL_FLAGS)
