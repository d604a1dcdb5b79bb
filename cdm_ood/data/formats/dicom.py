"""DICOM: recognised by its `DICM` prefix (or a bare data set without the preamble), its header read through
MONAI's `PydicomReader` (image storage objects with pixel data only; single-frame files grouped into series by
`discover`), its pixels decoded by pydicom's pixel API. A frame is (Rows, Columns), its samples as its
PhotometricInterpretation says (`PHOTOMETRIC`: MONOCHROME1 inverted as a viewer shows it, palette and YCbCr colour
as RGB); compressed transfer syntaxes need pydicom's plugins (`cdm-ood[codecs]`). Every failure is a typed error
naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ...utils.io import atomic_path
from ..errors import DataError, NotAnImageError, UnreadableFileError, UnsupportedFormatError
from ..guards import quiet_libraries, reading, redact, require_budget, require_deflated_budget
from ..headers import SeriesMember, orientation_of
from ..records import Slice, SourceFile
from .base import CONTEXT_COLUMNS, FormatReader, SeriesSlice, SliceKey, register_reader, slice_of

log = logging.getLogger("cdm_ood.ood")

CODECS_EXTRA = "cdm-ood[codecs]"
# The PhotometricInterpretations read (any other is unsupported): MONOCHROME2 and MONOCHROME1 (inverted over the
# modality LUT's output range of the stored values) give one grey channel after the modality LUT; PALETTE COLOR
# (through the palette), RGB and YCbCr give RGB (pydicom's decoders convert YBR_FULL and YBR_FULL_422, the JPEG
# 2000 decoders YBR_RCT and YBR_ICT).
PHOTOMETRIC = ("MONOCHROME2", "MONOCHROME1", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
# Defined terms of the standard that are named when refused; any other value is not copied into a reason.
UNSUPPORTED_PHOTOMETRIC = ("YBR_PARTIAL_420", "YBR_PARTIAL_422", "ARGB", "CMYK", "HSV")
# MONAI's readers disagree on MONOCHROME1: ITKReader inverts it (as cdm-ood's readers do), PydicomReader does not.
MONOCHROME1_LOADED = ("PhotometricInterpretation MONOCHROME1: MONAI's readers disagree on inverting it (ITKReader "
                      "does, PydicomReader does not); score the file by path")  # fmt: skip
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Every image storage SOP class of the DICOM standard, and no other, has this in its name (pydicom's UID
# dictionary): a known storage class without it holds no image to score (segmentation, RT dose/structures/plan,
# presentation state, structured report, encapsulated document, waveform, parametric map, registration, ...).
IMAGE_STORAGE = "Image Storage"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The fields a series is split by (`data.series`).
SPLIT_TAGS = ("ImageType", "EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "AcquisitionNumber", "PixelSpacing")
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", *SPLIT_TAGS,
)  # fmt: skip
# The fields of a report's study and series context (`score --series-context`), keyword -> report column.
CONTEXT_TAGS = dict(zip(("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
                        CONTEXT_COLUMNS, strict=True))  # fmt: skip
MALFORMED = "malformed"  # a split field's value that is not a number: its text is never copied
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@register_reader
class DicomReader(FormatReader):
    """DICOM files: a multi-frame file is a volume of frames, single-frame files are slices of their series."""

    name = "dicom"
    title = "DICOM"
    series = True
    suffix = ".dcm"
    instances = True

    def detect(self, path: Path, head: bytes) -> bool:
        return head[128:132] == b"DICM"

    def detect_gzipped(self, path: Path, inner: bytes) -> bool:
        return inner[128:132] == b"DICM" or looks_like_bare_dicom(inner)

    def detect_bare(self, path: Path, head: bytes) -> bool:
        return looks_like_bare_dicom(head) and dicom_header(path, strict=False) is not None

    def source(self, path: Path, max_voxels: int) -> SourceFile | SeriesSlice:
        require_deflated_budget(path, max_voxels)
        ds = dicom_header(path)
        _require_pixels(path, ds)
        series_uid, frames = _series_and_frames(path, ds)
        rows, columns, samples = header_ints(path, ds, ("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1))
        require_budget(path, (frames, rows, columns, samples), max_voxels)
        if frames > 1:
            return SourceFile(str(path), self.name, series_uid, None, _uid(ds))
        with quiet_libraries():  # keep the sort key and what the series checks need, not the header: memory stays flat
            member = _member(ds, (rows, columns))
        return SeriesSlice(path, series_uid, _position_key(ds, member.along), member)

    def slices(self, source: SourceFile) -> list[Slice]:
        pixels = _decode(Path(source.path))
        if pixels.shape[0] == 1:
            index = source.index if source.index is not None else 0
            return [slice_of(np.moveaxis(pixels[0], -1, 0), source, index)]
        return [slice_of(np.moveaxis(frame, -1, 0), source, k, frame=k) for k, frame in enumerate(pixels)]

    def context(self, path: str) -> dict[str, Optional[str]]:
        """The `CONTEXT_TAGS` of the file (None where absent), as its header holds them."""
        import pydicom

        with quiet_libraries(), reading(Path(path), "malformed DICOM header"):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(CONTEXT_TAGS))
            return {column: None if ds.get(k) in (None, "") else str(ds.get(k)) for k, column in CONTEXT_TAGS.items()}

    def loaded_flags(self, path: str) -> tuple[str, ...]:
        import pydicom

        with quiet_libraries():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PhotometricInterpretation"])
            monochrome1 = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
        return (MONOCHROME1_LOADED,) if monochrome1 else ()

    def write_like(self, source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
        """The input's dataset with new pixels (stored values = (value - intercept) / slope, in the input's range)
        under a new SeriesInstanceUID and SOPInstanceUID, stored uncompressed."""
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

    def write_map(self, slices: dict[SliceKey, tuple[Path, str]], out: Path, depth: int) -> bool:
        """The slice maps of a series of `depth` slices (0: up to its last slice with a map) stacked in series order
        under the affine of its ImageOrientationPatient, ImagePositionPatient and PixelSpacing (data `map[k].T`, as
        `volume_files.write_nifti` stores a volume), NaN where a slice has no map; a series without those tags
        gets no volume file (logged, False); slice maps of different sizes raise ValueError."""
        import pydicom

        from ..volume_files import write_nifti

        indices = sorted(index for _, index in slices)
        tags = ["ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness"]
        ends = [pydicom.dcmread(slices[(None, k)][1], stop_before_pixels=True, force=True, specific_tags=tags)
                for k in (indices[0], indices[-1])]  # fmt: skip
        try:
            orientation, spacing = [float(v) for v in ends[0].ImageOrientationPatient], ends[0].PixelSpacing
            first, last = (np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in ends)
        except (AttributeError, TypeError, ValueError):
            log.warning("%s: no slice geometry (orientation, position, spacing); no volume map written",
                        slices[(None, indices[0])][1])  # fmt: skip
            return False
        if len(indices) > 1:
            step = (last - first) / (indices[-1] - indices[0])
        else:
            step = np.cross(orientation[:3], orientation[3:]) * float(ends[0].get("SliceThickness") or 1.0)
        maps = {index: np.load(npy) for (_, index), (npy, _) in slices.items()}
        shapes = sorted({m.shape for m in maps.values()})
        if len(shapes) > 1:
            raise ValueError(f"its slices differ in size ({', '.join('x'.join(map(str, s)) for s in shapes)})")
        stack = np.full((max(depth, indices[-1] + 1), *shapes[0]), np.nan, np.float32)
        for index, amap in maps.items():
            stack[index] = amap
        write_nifti(stack, out, affine=series_affine(orientation, first - indices[0] * step, spacing, step))
        return True


def series_affine(
    orientation: Sequence[float], first: Sequence[float], spacing: Sequence[float], step: Sequence[float]
) -> np.ndarray:
    """The RAS affine of a DICOM series' voxels `data[col, row, k]` (slice k's pixel array transposed, the layout
    of `volume_files.write_nifti`), from its ImageOrientationPatient (row, then column direction cosines), the first
    slice's ImagePositionPatient, PixelSpacing (between rows, between columns) and the step from one slice's
    position to the next, all in the patient's LPS millimetres."""
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(orientation[:3], dtype=np.float64) * float(spacing[1])
    affine[:3, 1] = np.asarray(orientation[3:6], dtype=np.float64) * float(spacing[0])
    affine[:3, 2] = np.asarray(step, dtype=np.float64)
    affine[:3, 3] = np.asarray(first, dtype=np.float64)
    return _LPS_TO_RAS @ affine


def looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble starts with a group 0x0002 or 0x0008 element, followed by
    an explicit VR (two capital letters) or a small implicit-VR length."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return False
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
    return explicit_vr or int.from_bytes(head[4:8], "little") < 1024


def dicom_header(path: Path, strict: bool = True):
    """The DICOM header without pixel data, read through MONAI's PydicomReader, its `HEADER_TAGS` and file meta
    elements converted (an unknown value representation fails here); None if not DICOM (strict=False)."""
    from monai.data import PydicomReader

    # Large values (the pixel data) are deferred, not loaded: their presence is all the header pass needs.
    reader = PydicomReader(force=True, defer_size=256, specific_tags=[*HEADER_TAGS, *PIXEL_KEYWORDS])
    try:
        with quiet_libraries():
            ds = reader.read(str(path))
            _convert_values(ds, HEADER_TAGS)  # not the deferred pixel data: the header pass never loads it
    except Exception as err:  # pydicom raises many types on malformed streams
        if not strict:
            return None
        raise UnreadableFileError(path, f"malformed DICOM header: {redact(err)}") from None
    return ds


def _convert_values(ds, keywords: Optional[Sequence[str]] = None) -> None:
    """Convert the values of `keywords` (default: every element) and of the file meta now. pydicom converts a value
    on its first access, so a malformed one (an unknown value representation) fails inside the caller's guard, which
    names the file, instead of wherever it is first read."""
    if keywords is None:
        for _ in ds:  # iterating a dataset converts each element
            pass
    else:
        for keyword in keywords:
            ds.get(keyword)
    for _ in getattr(ds, "file_meta", None) or ():
        pass


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


def _member(ds, size: tuple[int, int]) -> SeriesMember:
    """What series assembly and the series checks need of a slice's header (`headers.SeriesMember`)."""
    image_type = ds.get("ImageType") or ()
    return SeriesMember(
        _uid(ds), size, orientation_of(ds),
        image_type=tuple(str(v).strip().upper() for v in (image_type if _multiple(image_type) else [image_type])),
        echo_number=_numbers(ds, "EchoNumbers"), echo_time=_numbers(ds, "EchoTime"),
        temporal_position=_numbers(ds, "TemporalPositionIdentifier"), acquisition=_numbers(ds, "AcquisitionNumber"),
        spacing=_numbers(ds, "PixelSpacing", digits=3), along=_along(ds),
    )  # fmt: skip


def _multiple(value) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, (list, tuple, MultiValue))


def _numbers(ds, keyword: str, digits: Optional[int] = None) -> Optional[str]:
    """A numeric header field as canonical text ('2', '0.5x0.5'; rounded to `digits` decimals), None when absent
    or empty, `MALFORMED` when a value is not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        numbers = [float(v) for v in (value if _multiple(value) else [value])]
    except (TypeError, ValueError):
        return MALFORMED
    return "x".join(f"{round(x, digits) if digits is not None else x:g}" for x in numbers) or None


def _along(ds) -> Optional[float]:
    """The slice's position along its normal (mm), None when its orientation or position is absent or malformed."""
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(6)
        position = np.asarray(ds.ImagePositionPatient, dtype=float).reshape(3)
        return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
    except (AttributeError, ValueError, TypeError):
        return None


def _position_key(ds, along: Optional[float]) -> tuple[float, float, str]:
    """Sort key of a slice in its series: its position `along` the slice normal (`_along`; 0 when unknown: ordered
    by InstanceNumber), then InstanceNumber."""
    along = 0.0 if along is None else along
    try:
        number = float(ds.InstanceNumber)
    except (AttributeError, ValueError, TypeError):
        number = 0.0
    return along, number, str(getattr(ds, "SOPInstanceUID", ""))


def _series_and_frames(path: Path, ds) -> tuple[str, int]:
    """The series a DICOM file belongs to (its own path if it names none) and its number of frames."""
    with quiet_libraries():
        series = str(ds.get("SeriesInstanceUID", "")) or str(path)
    (frames,) = header_ints(path, ds, ("NumberOfFrames", 1))
    return series, frames


def _uid(ds) -> Optional[str]:
    uid = getattr(ds, "SOPInstanceUID", None)
    return str(uid) if uid else None


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


def _decode(path: Path):
    """The decoded pixels (frames, rows, cols, samples): grey after the modality LUT (MONOCHROME1 inverted), or RGB
    (`PHOTOMETRIC`)."""
    from monai.data import PydicomReader
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    with reading(path, "malformed DICOM"):
        ds = PydicomReader(force=True).read(str(path))
        _convert_values(ds)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    frames, rows, columns, samples = header_ints(
        path, ds, ("NumberOfFrames", 1), ("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1)
    )
    interpretation = _interpretation(path, ds)
    inverse = _inversion(path, ds) if interpretation == "MONOCHROME1" else None
    try:
        pixels = ds.pixel_array
        if interpretation == "PALETTE COLOR":
            pixels, samples = apply_color_lut(pixels, ds), 3
        elif samples == 1:
            pixels = apply_modality_lut(pixels, ds)
            if inverse is not None:
                pixels = inverse - np.asarray(pixels, dtype=np.float64)
        shape = (frames, rows, columns, samples)
    except MemoryError:
        raise
    except Exception as err:  # decoders raise RuntimeError, ValueError, NotImplementedError, AttributeError
        raise _decode_error(path, syntax, err) from None
    if pixels.size != np.prod(shape):
        raise UnreadableFileError(path, f"pixel data of shape {pixels.shape} does not match the header {shape}")
    return pixels.reshape(shape)


def _interpretation(path: Path, ds) -> str:
    """The PhotometricInterpretation of `ds` (MONOCHROME2 when absent); one not in `PHOTOMETRIC` is unsupported."""
    with quiet_libraries():
        value = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if value not in PHOTOMETRIC:
        named = f"'{value}'" if value in UNSUPPORTED_PHOTOMETRIC else "of an unknown value"
        raise UnsupportedFormatError(path, f"PhotometricInterpretation {named} is not supported (only "
                                     f"{', '.join(PHOTOMETRIC)})")  # fmt: skip
    return value


def _inversion(path: Path, ds) -> float:
    """`lo + hi` of a MONOCHROME1 image, [lo, hi] the modality LUT's output range over the stored values (Bits
    Stored, Pixel Representation): `lo + hi - v` shows the lowest stored value white, as a viewer does."""
    from pydicom.pixels import apply_modality_lut

    if "BitsStored" not in ds:
        raise UnsupportedFormatError(path, "MONOCHROME1 without BitsStored (float pixel data): no stored range to "
                                     "invert over")  # fmt: skip
    bits, signed = header_ints(path, ds, ("BitsStored", 0), ("PixelRepresentation", 0))
    if not 1 <= bits <= 32:
        raise UnreadableFileError(path, "malformed DICOM header: BitsStored is not between 1 and 32")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.arange(lo, hi + 1) if hi - lo < 2**16 else np.array([lo, hi])
    with reading(path, "malformed DICOM modality LUT"):
        out = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    return float(out.min()) + float(out.max())


def _decode_error(path: Path, syntax, err: Exception) -> DataError:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    message = redact(err)
    if syntax is None:
        return UnreadableFileError(path, f"cannot decode pixel data: no transfer syntax in the file meta ({message})")
    if not isinstance(syntax, UID):  # e.g. several values: no transfer syntax pydicom could have used
        return UnreadableFileError(path, f"cannot decode pixel data: malformed transfer syntax ({message})")
    name = getattr(syntax, "name", str(syntax))
    try:
        plugins = get_decoder(syntax).available_plugins if syntax.is_compressed else None
    except (ValueError, NotImplementedError):  # a private transfer syntax, or one without decoders (video)
        return UnsupportedFormatError(path, f"transfer syntax '{name}' ({syntax}): pydicom has no decoder for it")
    if plugins is not None and "pylibjpeg" not in plugins:  # the decoders of the codecs extra are not installed
        return UnsupportedFormatError(
            path, f"cannot decode transfer syntax '{name}' ({syntax}) here: install {CODECS_EXTRA} [{message}]"
        )
    if plugins is not None:
        return UnreadableFileError(
            path, f"the installed decoders failed to decode '{name}' ({syntax}) pixel data: {message}"
        )
    if "less than expected" in message or "doesn't match the expected" in message:
        return UnreadableFileError(path, f"truncated pixel data: {message}")
    return UnreadableFileError(path, f"cannot decode '{name}' pixel data: {message}")
