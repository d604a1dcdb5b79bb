"""Finding the inputs: every file below the given paths, its format decided by content (not suffix), checked
before anything is decoded (`guards`: regular files, the voxel budget), DICOM slices grouped into series by their
headers, and headers that disagree with themselves flagged (`headers`). Every failure is a typed error naming the
file; `readers` decodes what this finds.
"""

from __future__ import annotations

import gzip
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..progress import ProgressFactory, counted
from .errors import (
    DataError,
    NotAnImageError,
    TooLargeError,
    UnreadableFileError,
    UnsupportedFormatError,
    report_error,
)
from .guards import (
    MAX_VOXELS,
    quiet_libraries,
    reading,
    redact,
    require_budget,
    require_deflated_budget,
    require_regular_file,
)
from .headers import SeriesMember, nifti_flags, orientation_of, series_flags
from .itk_io import data_file, header_shape, itk_kind
from .walk import DEFAULT_IGNORE, IgnoredFile, walk_files

PathLike = str | os.PathLike
ErrorHandler = Callable[[DataError], None]
Exclude = Callable[[Path], bool]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Every image storage SOP class of the DICOM standard, and no other, has this in its name (pydicom's UID
# dictionary): a known storage class without it holds no image to score (segmentation, RT dose/structures/plan,
# presentation state, structured report, encapsulated document, waveform, parametric map, registration, ...).
IMAGE_STORAGE = "Image Storage"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel",
)  # fmt: skip

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


@dataclass(frozen=True)
class SourceFile:
    """One readable input file, found by `discover`: its format and the volume it belongs to.

    `index` is the slice's rank in its DICOM series (None for files holding whole volumes); `companions` are
    files read together with this one (the .img of a NIfTI .hdr/.img pair); `flags` are its header's problems
    (`headers`), which every slice read from it carries.
    """

    path: str
    format: str
    volume_id: str
    index: Optional[int] = None
    sop_instance_uid: Optional[str] = None
    companions: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


def _head(path: Path, n: int = 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _nifti_kind(head: bytes) -> Optional[str]:
    """'nifti' for a NIfTI-1/2 header, 'analyze' for a bare Analyze 7.5 header, else None."""
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if sizeof_hdr == 348 and len(head) >= 348:
            return "nifti" if head[344:348] in (b"n+1\x00", b"ni1\x00") else "analyze"
        if sizeof_hdr == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            return "nifti"
    return None


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble starts with a group 0x0002 or 0x0008 element, followed by
    an explicit VR (two capital letters) or a small implicit-VR length."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return False
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
    return explicit_vr or int.from_bytes(head[4:8], "little") < 1024


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def detect_format(path: PathLike) -> str:
    """'dicom', 'nifti', 'itk' (NRRD, MetaImage) or 'image' (PNG/JPEG), decided by the file's content.

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
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        return "image"
    if head[:2] == b"\x1f\x8b":
        return _detect_gzip(path)
    kind = _nifti_kind(head)
    if kind == "nifti":
        return "nifti"
    if kind == "analyze":
        raise UnsupportedFormatError(path, "Analyze 7.5 header without NIfTI magic (orientation is ambiguous); "
                                     "convert it to NIfTI")  # fmt: skip
    for magic, offset, error, reason in _KNOWN_OTHER:
        if head[offset : offset + len(magic)] == magic:
            raise error(path, reason)
    if itk_kind(path, head):
        return "itk"
    _raise_for_known_suffix(path)
    if _looks_like_bare_dicom(head) and _dicom_header(path, strict=False) is not None:
        return "dicom"
    header = path.with_suffix(_VOXEL_FILES.get(path.suffix.lower(), path.suffix))
    if header != path and header.exists():
        raise NotAnImageError(path, f"raw voxel data of the header {header.name}; read the header")
    if _is_text(head):
        raise NotAnImageError(path, "text file, not an image")
    raise NotAnImageError(path, "unrecognised content: not DICOM, NIfTI, NRRD, MetaImage, PNG or JPEG")


def _raise_for_known_suffix(path: Path) -> None:
    """Name the format of files recognised only by suffix (PAR/REC pixel files, AFNI, MGH), also when gzipped."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIX_OTHER:
        error, reason = _SUFFIX_OTHER[suffixes[-1]]
        raise error(path, reason)


def _detect_gzip(path: Path) -> str:
    try:
        with gzip.open(path, "rb") as f:
            inner = f.read(1024)
    except (OSError, EOFError) as err:
        raise UnreadableFileError(path, f"corrupt gzip stream: {redact(err)}") from None
    if _nifti_kind(inner) == "nifti":
        return "nifti"
    if inner[128:132] == b"DICM" or _looks_like_bare_dicom(inner):
        raise UnsupportedFormatError(path, "gzip-compressed DICOM; decompress it first")
    _raise_for_known_suffix(path)
    raise NotAnImageError(path, "gzip-compressed file that holds no NIfTI volume")


def _dicom_header(path: Path, strict: bool = True):
    """The DICOM header without pixel data, read through MONAI's PydicomReader; None if not DICOM (strict=False)."""
    from monai.data import PydicomReader

    # Large values (the pixel data) are deferred, not loaded: their presence is all the header pass needs.
    reader = PydicomReader(force=True, defer_size=256, specific_tags=[*HEADER_TAGS, *PIXEL_KEYWORDS])
    try:
        with quiet_libraries():
            ds = reader.read(str(path))
    except Exception as err:  # pydicom raises many types on malformed streams
        if not strict:
            return None
        raise UnreadableFileError(path, f"malformed DICOM header: {redact(err)}") from None
    return ds


def _position_key(ds) -> tuple[float, float, str]:
    """Sort key of a slice in its series: position along the slice normal, then InstanceNumber."""
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        along = float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
    except (AttributeError, ValueError, TypeError):
        along = 0.0
    try:
        number = float(ds.InstanceNumber)
    except (AttributeError, ValueError, TypeError):
        number = 0.0
    return along, number, str(getattr(ds, "SOPInstanceUID", ""))


def discover(
    paths: PathLike | Sequence[PathLike],
    on_error: Optional[ErrorHandler] = None,
    max_voxels: int = MAX_VOXELS,
    exclude: Optional[Exclude] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    progress: Optional[ProgressFactory] = None,
    on_ignored: Optional[Callable[[IgnoredFile], None]] = None,
) -> list[SourceFile]:
    """Every readable file below `paths` (files or folders, recursively), DICOM slices grouped into series.

    Single-frame DICOM files that share a SeriesInstanceUID form one volume, ranked by position along the
    slice normal (then InstanceNumber); files of a series that share a SOPInstanceUID or differ from it in
    Rows/Columns or ImageOrientationPatient, and NIfTI files with disagreeing qform/sform or undefined scaling, get
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
    series: dict[str, list[tuple[tuple[float, float, str], Path, SeriesMember]]] = defaultdict(list)
    for path in counted(files, progress(len(files), "reading headers") if progress else None):
        if path in voxel_files:
            continue
        if not path.exists():
            report_error(UnreadableFileError(path, "no such file or folder"), on_error)
            continue
        try:
            require_regular_file(path)
            fmt = detect_format(path)
            if fmt != "dicom":
                sources.append(_volume_source(path, fmt, max_voxels))
                continue
            require_deflated_budget(path, max_voxels)
            ds = _dicom_header(path)
            _require_pixels(path, ds)
            series_uid, frames = _series_and_frames(path, ds)
            rows, columns, samples = header_ints(path, ds, ("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1))
            require_budget(path, (frames, rows, columns, samples), max_voxels)
        except DataError as err:
            report_error(err, on_error)
            if path in pairs:
                report_error(type(err)(pairs[path], f"voxel file of {path.name}: {err.reason}"), on_error)
            continue
        if frames > 1:
            sources.append(SourceFile(str(path), "dicom", series_uid, None, _uid(ds)))
        else:  # keep the sort key and what the series checks need, not the header: memory stays flat
            with quiet_libraries():
                member = SeriesMember(_uid(ds), (rows, columns), orientation_of(ds))
            series[series_uid].append((_position_key(ds), path, member))
    for series_uid, members in series.items():
        members.sort(key=lambda m: m[0])
        flags = series_flags([member for _, _, member in members])
        sources.extend(
            SourceFile(str(path), "dicom", series_uid, rank, member.uid, flags=found)
            for rank, ((_, path, member), found) in enumerate(zip(members, flags, strict=True))
        )
    return sources


def _series_and_frames(path: Path, ds) -> tuple[str, int]:
    """The series a DICOM file belongs to (its own path if it names none) and its number of frames."""
    with quiet_libraries():
        series = str(ds.get("SeriesInstanceUID", "")) or str(path)
    (frames,) = header_ints(path, ds, ("NumberOfFrames", 1))
    return series, frames


def header_ints(path: Path, ds, *fields: tuple[str, int]) -> tuple[int, ...]:
    """Whole-number header fields (keyword, default when absent or empty); a malformed one is named, its
    content never copied."""
    values = []
    for keyword, default in fields:
        try:
            with quiet_libraries():
                value = ds.get(keyword, default)
                values.append(default if value in (None, "") else int(value))
        except (ValueError, TypeError, OverflowError):
            raise UnreadableFileError(path, f"malformed DICOM header: {keyword} is not a whole number") from None
        if values[-1] < 0:
            raise UnreadableFileError(path, f"malformed DICOM header: {keyword} is negative")
    return tuple(values)


def _uid(ds) -> Optional[str]:
    uid = getattr(ds, "SOPInstanceUID", None)
    return str(uid) if uid else None


def voxel_file(path: Path) -> Optional[Path]:
    """The voxel file of a header: the .img of an .hdr, the detached data file of a .mhd or .nhdr."""
    return path.with_suffix(".img") if path.suffix.lower() == ".hdr" else data_file(path)


def _volume_source(path: Path, fmt: str, max_voxels: int) -> SourceFile:
    companions: tuple[str, ...] = ()
    if fmt == "itk":
        require_budget(path, header_shape(path, itk_kind(path, _head(path))), max_voxels)
        voxels = data_file(path)
        return SourceFile(str(path), fmt, str(path), companions=(str(voxels),) if voxels else ())
    if fmt == "nifti" and not path.name.lower().endswith((".nii", ".nii.gz", ".hdr")):
        raise UnsupportedFormatError(path, "NIfTI content under another suffix: nibabel reads NIfTI only as .nii, "
                                     ".nii.gz or .hdr/.img; copy it to such a name")  # fmt: skip
    if fmt == "nifti" and path.suffix.lower() == ".hdr":
        img = path.with_suffix(".img")
        if not img.exists():
            raise UnreadableFileError(path, f"NIfTI header without its voxel file {img.name}")
        companions = (str(img),)
    if fmt != "nifti":
        require_budget(path, _image_shape(path), max_voxels)
        return SourceFile(str(path), fmt, str(path), companions=companions)
    shape, flags = _nifti_header(path)
    require_budget(path, shape, max_voxels)
    return SourceFile(str(path), fmt, str(path), companions=companions, flags=flags)


def _nifti_header(path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The shape a NIfTI header declares and its flags (`headers.nifti_flags`); only the header is read, also from
    a .nii.gz."""
    import nibabel as nib

    with reading(path, "malformed NIfTI header"):
        image = nib.load(str(path))
        return tuple(int(s) for s in image.shape), nifti_flags(path, type(getattr(image, "nifti_header", image.header)))


def _image_shape(path: Path) -> tuple[int, ...]:
    """(bands, height, width) from a PNG/JPEG header, without decoding the pixels."""
    from PIL import Image

    try:
        with quiet_libraries(), Image.open(path) as image:
            return len(image.getbands()), image.height, image.width
    except Image.DecompressionBombError:
        raise TooLargeError(path, "declares more pixels than Pillow's decompression-bomb limit: refused without "
                            "decoding") from None  # fmt: skip
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError / SyntaxError / ValueError on broken headers
        raise UnreadableFileError(path, f"cannot decode image (truncated or corrupt): {redact(err)}") from None


def _require_pixels(path: Path, ds) -> None:
    """Refuse DICOMDIRs, objects of a known SOP class that is not an image storage class (`IMAGE_STORAGE`; also
    those with pixel data, e.g. a 1-bit segmentation), and objects without pixel data. A missing, private or
    unknown SOP class is judged by its pixel data alone."""
    from pydicom.uid import UID

    sop_class = getattr(ds, "SOPClassUID", None)
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if DICOMDIR_SOP_CLASS in (sop_class, media_class):
        raise NotAnImageError(path, "DICOMDIR (an index of other files, no pixels)")
    uid = UID(str(sop_class or media_class or ""))
    if uid.type == "SOP Class" and IMAGE_STORAGE not in uid.name:
        raise NotAnImageError(path, f"a {uid.name} object (SOP class {uid}) is not an image: never scored")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        name = getattr(sop_class, "name", None) or "unknown SOP class"
        if "Rows" in ds and "Columns" in ds:
            raise UnreadableFileError(path, f"no pixel data in a {name} object that declares an image size")
        if name.endswith("Image Storage"):
            raise UnreadableFileError(path, f"no pixel data in a {name} object: the file is truncated or incomplete")
        raise NotAnImageError(path, f"DICOM object without pixel data ({name})")
