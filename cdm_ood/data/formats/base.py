"""The interface of an input format's reader and the registry of readers (modelled on MONAI's `ImageReader`: which
files it reads, then their data): `discovery` asks the readers in `READERS` order which one a file's content is,
then that reader for the file's header (`source`: geometry, voxel budget, header flags), `readers` for its slices.
What other modules need to know of a format (canonical orientation, series, writing files like it) is asked of
its reader, never of its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from ...errors import UsageError
from ..errors import UnsupportedFormatError
from ..headers import SeriesMember
from ..records import Slice, SliceSource, SourceFile, quality_flags

# The study and series context a reader may give (`FormatReader.context`, `score --series-context`).
CONTEXT_COLUMNS = ("study_instance_uid", "series_instance_uid", "modality", "series_number", "series_description")
SliceKey = tuple[Optional[int], int]  # (time point of a 4D volume or None, slice or frame index)


@dataclass(frozen=True)
class SeriesSlice:
    """A file that holds one slice of a multi-file series (a single-frame DICOM file): `discover` ranks the files
    of each series by `key` and flags the series' disagreements from their `member` headers (`headers`)."""

    path: Path
    series_uid: str
    key: tuple
    member: SeriesMember


class FormatReader(ABC):
    """Reads one input format, recognised by content; `register_reader` makes it one of `READERS`.

    Detection runs in stages, in `READERS` order within each: `detect` (a binary signature), `detect_gzipped`
    (a gzip stream's content), `detect_text` (a text header, after the signatures of the known formats cdm-ood
    refuses), `detect_bare` (no signature at all, after the suffixes of refused formats). Each returns whether the
    file is of this format, and may raise a `DataError` for a variant of it that is refused (Analyze for NIfTI).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # how reasons name the format ("NRRD, MetaImage")
    canonical: ClassVar[bool] = False  # slices are those of the closest canonical (RAS) volume, `data[:, :, k].T`
    series: ClassVar[bool] = False  # a file holds a slice of a multi-file series, or frames: never a volume
    gzip: ClassVar[bool] = False  # whether it reads gzip-compressed files (else `detect_gzipped` refuses them)
    suffix: ClassVar[Optional[str]] = None  # of a derived file written like the input (`write_like`); None: never
    instances: ClassVar[bool] = False  # its files are DICOM instances: results can be DICOM objects referencing them

    def detect(self, path: Path, head: bytes) -> bool:
        """Whether `head` (the file's first 1024 bytes) starts with this format's binary signature."""
        return False

    def detect_gzipped(self, path: Path, inner: bytes) -> bool:
        """Whether a gzip stream's first 1024 decompressed bytes `inner` are of this format."""
        return False

    def detect_text(self, path: Path, head: bytes) -> bool:
        """Whether `head` is this format's text header."""
        return False

    def detect_bare(self, path: Path, head: bytes) -> bool:
        """Whether a file without any known signature is of this format."""
        return False

    @abstractmethod
    def source(self, path: Path, max_voxels: int) -> SourceFile | SeriesSlice:
        """The file as `discover` lists it, from its header alone: refused when it declares more than `max_voxels`
        voxels; a `SeriesSlice` for a slice of a multi-file series."""

    @abstractmethod
    def slices(self, source: SourceFile) -> list[Slice]:
        """The decoded slices of `source`, rows first as displayed (`slice_of`)."""

    def context(self, path: str) -> dict[str, Optional[str]]:
        """The study and series context of the file at `path` (a value, or None, for some of `CONTEXT_COLUMNS`);
        none for formats without it."""
        return {}

    def loaded_flags(self, path: str) -> tuple[str, ...]:
        """Flags of the file at `path` when MONAI's `LoadImage` decoded it instead (where the two may differ)."""
        return ()

    def write_like(self, source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
        """Write `slices` ((C, H, W) arrays in the input's units and size) as a file like `source` to `out`;
        `series_uid` is the new series of a series format's output."""
        raise UnsupportedFormatError(source, f"not written back: {self.title} files are not written")

    def write_map(self, slices: dict[SliceKey, tuple[Path, str]], out: Path, depth: int) -> bool:
        """Write the slice maps of one input volume (each slice's map, an (H, W) `.npy` file, and its input file) as
        a NIfTI volume `out` with the input's geometry (`depth`: a series' number of slices, 0 when unknown). False
        when this format has no such volume file."""
        return False


READERS: dict[str, FormatReader] = {}


def register_reader(reader: type[FormatReader]) -> type[FormatReader]:
    """Class decorator that makes a `FormatReader` subclass (a `name`, a `title`, one of the `detect` methods,
    `source` and `slices`) one of `READERS`, asked after those registered before it: `discover`, `iter_slices` and
    `cdm-ood score` read its files from then on. A new format is one file that defines and registers its reader,
    imported before the files are read. Refuses a name already taken."""
    if reader.name in READERS and type(READERS[reader.name]) is not reader:
        raise UsageError(f"a reader named {reader.name!r} is already registered ({type(READERS[reader.name])})")
    READERS[reader.name] = reader()
    return reader


def reader_of(name: str) -> FormatReader:
    """The registered reader of the format `name` (`SourceFile.format`)."""
    if name not in READERS:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(READERS)}")
    return READERS[name]


def slice_of(image: np.ndarray, source: SourceFile, index: int, **extra) -> Slice:
    """A slice of `source` with its file's header flags and its pixels' quality flags."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    where = SliceSource(source.path, index, source.volume_id, source.sop_instance_uid, part=source.part, **extra)
    return Slice(image, where, (*source.flags, *quality_flags(image)))


def volume_slices(data: np.ndarray, source: SourceFile, kind: str) -> list[Slice]:
    """The axial slices `data[:, :, k].T` of a canonical (x, y, z[, t]) volume, for every time point."""
    path = source.path
    if data.dtype.kind not in "fiub":
        raise UnsupportedFormatError(path, f"voxel type {data.dtype} (complex or RGB {kind}) is not supported")
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise UnsupportedFormatError(path, f"{data.ndim}-D {kind} data of shape {data.shape}: only 2D, 3D and 4D")
    if data.ndim == 3:
        return [slice_of(data[None, :, :, k].transpose(0, 2, 1), source, k) for k in range(data.shape[2])]
    return [
        slice_of(data[None, :, :, k, t].transpose(0, 2, 1), source, k, time_point=t)
        for t in range(data.shape[3])
        for k in range(data.shape[2])
    ]
