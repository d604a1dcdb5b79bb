"""Finding the inputs: every file below the given paths, its format decided by content (not suffix) by the
registered readers (`formats.READERS`), checked before anything is decoded (`guards`: regular files, the voxel
budget; each reader's header pass), slices of multi-file series (DICOM) grouped into series by their headers, and
headers that disagree with themselves flagged (`headers`). Every failure is a typed error naming the file;
`readers` decodes what this finds.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from ..utils.progress import ProgressFactory, counted
from .errors import DataError, NotAnImageError, UnreadableFileError, UnsupportedFormatError, report_error
from .formats import READERS, FormatReader, SeriesSlice
from .guards import MAX_VOXELS, redact, require_regular_file
from .headers import series_flags
from .itk_io import data_file
from .records import SourceFile
from .series import part_volume_id, split_series
from .walk import DEFAULT_IGNORE, IgnoredFile, walk_files

PathLike = str | os.PathLike
ErrorHandler = Callable[[DataError], None]
Exclude = Callable[[Path], bool]

# (magic bytes, offset, error class, reason) for formats that are recognised but not images cdm-ood reads.
_KNOWN_OTHER = (
    (b"CDF\x01", 0, UnsupportedFormatError, "MINC-1 (NetCDF) volume is not supported; convert it to NIfTI"),
    (b"CDF\x02", 0, UnsupportedFormatError, "MINC-1 (NetCDF) volume is not supported; convert it to NIfTI"),
    (b"\x89HDF\r\n\x1a\n", 0, UnsupportedFormatError, "HDF5 / MINC-2 volume is not supported; convert it to NIfTI"),
    (b"MATRIX", 0, UnsupportedFormatError, "ECAT7 PET volume is not supported; convert it to NIfTI"),
    (b"# === DATA DESCRIPTION FILE", 0, UnsupportedFormatError, "Philips PAR header is not supported; convert the "
     "PAR/REC pair to NIfTI"),
    (b"TRACK", 0, NotAnImageError, "TrackVis tractogram (streamlines, not an image)"),
    (b"mrtrix tracks", 0, NotAnImageError, "MRtrix tractogram (streamlines, not an image)"),
    (b"II*\x00", 0, UnsupportedFormatError, "TIFF images are not supported; convert to PNG"),
    (b"MM\x00*", 0, UnsupportedFormatError, "TIFF images are not supported; convert to PNG"),
)  # fmt: skip
# Voxel files of a header pair: suffix -> the header's suffix (when the header is not among the files walked).
_VOXEL_FILES = {".img": ".hdr", ".raw": ".mhd", ".zraw": ".mhd"}
_SUFFIX_OTHER = {
    ".rec": (UnsupportedFormatError, "Philips REC pixel file is not supported; convert the PAR/REC pair to NIfTI"),
    ".brik": (UnsupportedFormatError, "AFNI BRIK volume is not supported; convert it to NIfTI"),
    ".head": (UnsupportedFormatError, "AFNI HEAD header is not supported; convert the HEAD/BRIK pair to NIfTI"),
    ".mgh": (UnsupportedFormatError, "FreeSurfer MGH volume is not supported; convert it to NIfTI"),
    ".mgz": (UnsupportedFormatError, "FreeSurfer MGZ volume is not supported; convert it to NIfTI"),
    ".v": (UnsupportedFormatError, "ECAT7 PET volume is not supported; convert it to NIfTI"),
}


def _head(path: Path, n: int = 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def detect_format(path: PathLike) -> str:
    """The name of the reader of the file at `path` ('dicom', 'nifti', 'itk' (NRRD, MetaImage), 'image' (PNG/JPEG),
    or one registered since), decided by the file's content (`detect_reader`)."""
    return detect_reader(path).name


def detect_reader(path: PathLike) -> FormatReader:
    """The registered reader of the file at `path`, decided by its content: the readers' binary signatures, a gzip
    stream's content, the signatures of formats cdm-ood refuses, the readers' text headers, the suffixes of refused
    formats, then content without a signature (`FormatReader`).

    Raises:
        UnreadableFileError: the file is empty or cannot be opened.
        UnsupportedFormatError: a recognised image format that cdm-ood does not read (MINC, PAR/REC, ...).
        NotAnImageError: anything else (text, tractograms, unknown binaries).
    """
    path = Path(path)
    try:
        head = _head(path)
    except OSError as err:
        raise UnreadableFileError(path, f"cannot open file: {err.strerror or err}") from None
    if not head:
        raise UnreadableFileError(path, "empty file")
    if found := _first(lambda r: r.detect(path, head)):
        return found
    if head[:2] == b"\x1f\x8b":
        return _detect_gzip(path)
    for magic, offset, error, reason in _KNOWN_OTHER:
        if head[offset : offset + len(magic)] == magic:
            raise error(path, reason)
    if found := _first(lambda r: r.detect_text(path, head)):
        return found
    _raise_for_known_suffix(path)
    if found := _first(lambda r: r.detect_bare(path, head)):
        return found
    header = path.with_suffix(_VOXEL_FILES.get(path.suffix.lower(), path.suffix))
    if header != path and header.exists():
        raise NotAnImageError(path, f"raw voxel data of the header {header.name}; read the header")
    if _is_text(head):
        raise NotAnImageError(path, "text file, not an image")
    titles = ", ".join(r.title for r in READERS.values())
    raise NotAnImageError(path, f"unrecognised content: not {titles}")


def _first(test: Callable[[FormatReader], bool]) -> Optional[FormatReader]:
    """The first registered reader that passes `test`."""
    return next((r for r in READERS.values() if test(r)), None)


def _raise_for_known_suffix(path: Path) -> None:
    """Name the format of files recognised only by suffix (PAR/REC pixel files, AFNI, MGH), also when gzipped."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIX_OTHER:
        error, reason = _SUFFIX_OTHER[suffixes[-1]]
        raise error(path, reason)


def _detect_gzip(path: Path) -> FormatReader:
    """The reader of a gzip stream's content, when it reads such streams (`FormatReader.gzip`); a format it does
    not read compressed is refused by name."""
    try:
        with gzip.open(path, "rb") as f:
            inner = f.read(1024)
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a deflate stream that is not one
        raise UnreadableFileError(path, f"corrupt gzip stream: {redact(err)}") from None
    found = [r for r in READERS.values() if r.detect_gzipped(path, inner)]
    if readable := [r for r in found if r.gzip]:
        return readable[0]
    if found:
        raise UnsupportedFormatError(path, f"gzip-compressed {found[0].title}; decompress it first")
    _raise_for_known_suffix(path)
    titles = " or ".join(r.title for r in READERS.values() if r.gzip)
    raise NotAnImageError(path, f"gzip-compressed file that holds no {titles} volume")


def discover(
    paths: PathLike | Sequence[PathLike],
    on_error: Optional[ErrorHandler] = None,
    max_voxels: int = MAX_VOXELS,
    exclude: Optional[Exclude] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    progress: Optional[ProgressFactory] = None,
    on_ignored: Optional[Callable[[IgnoredFile], None]] = None,
) -> list[SourceFile]:
    """Every readable file below `paths` (files or folders, recursively), its header read by its reader
    (`formats.FormatReader.source`), slices of multi-file series (DICOM) grouped into series.

    Single-frame DICOM files that share a SeriesInstanceUID form one volume, or one per part when they are not one
    acquisition (`series.split_series`: localizer, echo, time point, orientation, size, spacing), each ranked by
    position along the slice normal (then InstanceNumber); files of a series that share a SOPInstanceUID or lack the
    ImageOrientationPatient others have, and NIfTI files with disagreeing qform/sform or undefined scaling, get
    `flags` (`headers`). A file that cannot be read, is not a regular file or declares more than `max_voxels`
    voxels is passed to `on_error`, or raised when `on_error` is None. Files that a folder walk finds are left out
    when `exclude(path)` is true (e.g. a report being written into the scanned folder) or an `ignore` glob matches
    them (`walk.ignore_match`; by default `DEFAULT_IGNORE`: manifests, sidecars, DICOMDIR, ...), each of those
    passed to `on_ignored`. A header's voxel file (.img, .raw) shares its header's outcome. `progress(total,
    "reading headers")` is called once the files are listed, its result after each header.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = list(walk_files(paths, on_error, exclude, ignore, on_ignored))
    walked = set(files)
    pairs = {path: voxels for path in files if (voxels := voxel_file(path)) in walked}
    voxel_files = set(pairs.values())
    sources: list[SourceFile] = []
    series: dict[tuple[str, str], list[SeriesSlice]] = defaultdict(list)
    for path in counted(files, progress(len(files), "reading headers") if progress else None):
        if path in voxel_files:
            continue
        if not path.exists():
            report_error(UnreadableFileError(path, "no such file or folder"), on_error)
            continue
        try:
            require_regular_file(path)
            reader = detect_reader(path)
            entry = reader.source(path, max_voxels)
        except DataError as err:
            report_error(err, on_error)
            if path in pairs:
                report_error(type(err)(pairs[path], f"voxel file of {path.name}: {err.reason}"), on_error)
            continue
        if isinstance(entry, SeriesSlice):
            series[(reader.name, entry.series_uid)].append(entry)
        else:
            sources.append(entry)
    for (name, series_uid), members in series.items():
        members.sort(key=lambda m: m.key)
        headers = [m.member for m in members]
        flags = series_flags(headers)
        for part, indices in split_series(headers):
            volume, reason = part_volume_id(series_uid, part), part.reason if part else ""
            sources.extend(SourceFile(str(members[i].path), name, volume, rank, headers[i].uid, flags=flags[i],
                                      part=reason) for rank, i in enumerate(indices))  # fmt: skip
    return sources


def voxel_file(path: Path) -> Optional[Path]:
    """The voxel file of a header: the .img of an .hdr, the detached data file of a .mhd or .nhdr."""
    return path.with_suffix(".img") if path.suffix.lower() == ".hdr" else data_file(path)
