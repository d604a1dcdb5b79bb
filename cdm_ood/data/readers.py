"""Decoding what `discovery` found and checked into 2D slices, each file by its format's reader
(`formats.READERS`: DICOM, NIfTI, NRRD/MetaImage, PNG/JPEG, and any registered since); every failure becomes a
typed error naming the file.

Slices are row-major as displayed: a DICOM frame is (Rows, Columns), its samples as its PhotometricInterpretation
says (`formats.dicom.PHOTOMETRIC`: MONOCHROME1 inverted as a viewer shows it, palette and YCbCr colour as RGB); a
NIfTI or ITK volume, turned to its closest canonical (RAS) orientation, gives the axial slices `data[:, :, k].T`;
a 4D NIfTI gives those slices for every time point. Files are opened read-only and nothing is ever written next
to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

from .discovery import ErrorHandler, PathLike, discover
from .errors import DataError, UnreadableFileError, report_error
from .formats import reader_of
from .guards import MAX_VOXELS, quiet_libraries
from .records import Slice, SourceFile
from .walk import DEFAULT_IGNORE


def read_source(source: SourceFile) -> list[Slice]:
    """The slices of one discovered file, with quality flags. Raises a DataError naming the file (also when
    decoding it runs out of memory: that file fails, not the batch)."""
    reader = reader_of(source.format)
    try:
        with quiet_libraries():
            return reader.slices(source)
    except MemoryError:
        raise UnreadableFileError(source.path, "out of memory while decoding; the file was not scored") from None


def read_file(path: PathLike, max_voxels: int = MAX_VOXELS) -> list[Slice]:
    """The slices of a single file (a DICOM file is read on its own, as a series of one)."""
    (source,) = discover(path, max_voxels=max_voxels)
    return read_source(source)


def iter_slices(
    paths: PathLike | Sequence[PathLike],
    on_error: Optional[ErrorHandler] = None,
    max_voxels: int = MAX_VOXELS,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> Iterator[Slice]:
    """All slices below `paths` (files or folders), in a deterministic order; files in folders that an `ignore`
    glob matches (by default `DEFAULT_IGNORE`: manifests, sidecars, DICOMDIR, ...) are left out.

    With `on_error`, each file that fails is reported to it and the iteration goes on; without, the first
    failure is raised.
    """
    for source in discover(paths, on_error, max_voxels, ignore=ignore):
        try:
            yield from read_source(source)
        except DataError as err:
            report_error(err, on_error)


def count_by_kind(errors: Iterable[DataError]) -> dict[str, int]:
    """How many errors of each kind (`unreadable`, `unsupported`, `not-an-image`)."""
    counts: dict[str, int] = defaultdict(int)
    for err in errors:
        counts[err.kind] += 1
    return dict(counts)
