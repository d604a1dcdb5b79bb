"""Decoding DICOM, NIfTI, NRRD/MetaImage and PNG/JPEG into 2D slices: MONAI's readers (and pydicom's pixel API)
do the reading of what `discovery` found and checked; every failure becomes a typed error naming the file.

Slices are row-major as displayed: a DICOM frame is (Rows, Columns), its samples as its PhotometricInterpretation
says (`PHOTOMETRIC`: MONOCHROME1 inverted as a viewer shows it, palette and YCbCr colour as RGB); a NIfTI or ITK
volume, turned to its closest canonical (RAS) orientation, gives the axial slices `data[:, :, k].T`; a 4D NIfTI
gives those slices for every time point. Files are opened read-only and nothing is ever written next to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .discovery import ErrorHandler, PathLike, SourceFile, discover, header_ints, report_error
from .errors import DataError, UnreadableFileError, UnsupportedFormatError
from .guards import MAX_VOXELS, quiet_libraries, reading, redact
from .itk_io import itk_kind, read_itk
from .records import Slice, SliceSource, quality_flags
from .walk import DEFAULT_IGNORE

CODECS_EXTRA = "cdm-ood[codecs]"
# The PhotometricInterpretations read (any other is unsupported): MONOCHROME2 and MONOCHROME1 (inverted over the
# modality LUT's output range of the stored values) give one grey channel after the modality LUT; PALETTE COLOR
# (through the palette), RGB and YCbCr give RGB (pydicom's decoders convert YBR_FULL and YBR_FULL_422, the JPEG
# 2000 decoders YBR_RCT and YBR_ICT).
PHOTOMETRIC = ("MONOCHROME2", "MONOCHROME1", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
# Defined terms of the standard that are named when refused; any other value is not copied into a reason.
UNSUPPORTED_PHOTOMETRIC = ("YBR_PARTIAL_420", "YBR_PARTIAL_422", "ARGB", "CMYK", "HSV")


def read_source(source: SourceFile) -> list[Slice]:
    """The slices of one discovered file, with quality flags. Raises a DataError naming the file (also when
    decoding it runs out of memory: that file fails, not the batch)."""
    reader = {"dicom": _read_dicom, "nifti": _read_nifti, "itk": _read_itk, "image": _read_image}[source.format]
    try:
        with quiet_libraries():
            return reader(source)
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


def _slice(image: np.ndarray, source: SourceFile, index: int, **extra) -> Slice:
    """A slice of `source` with its file's header flags and its pixels' quality flags."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    where = SliceSource(source.path, index, source.volume_id, source.sop_instance_uid, **extra)
    return Slice(image, where, (*source.flags, *quality_flags(image)))


def _decode_dicom(path: Path):
    """The decoded pixels (frames, rows, cols, samples): grey after the modality LUT (MONOCHROME1 inverted), or RGB
    (`PHOTOMETRIC`)."""
    from monai.data import PydicomReader
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    with reading(path, "malformed DICOM"):
        ds = PydicomReader(force=True).read(str(path))
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

    message = redact(err)
    if syntax is None:
        return UnreadableFileError(path, f"cannot decode pixel data: no transfer syntax in the file meta ({message})")
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


def _read_dicom(source: SourceFile) -> list[Slice]:
    pixels = _decode_dicom(Path(source.path))
    if pixels.shape[0] == 1:
        index = source.index if source.index is not None else 0
        return [_slice(np.moveaxis(pixels[0], -1, 0), source, index)]
    return [_slice(np.moveaxis(frame, -1, 0), source, k, frame=k) for k, frame in enumerate(pixels)]


def _read_nifti(source: SourceFile) -> list[Slice]:
    import nibabel as nib
    from monai.data import NibabelReader

    path = Path(source.path)
    with reading(path, "malformed NIfTI header"):
        image = nib.load(str(path))
        intent = int(getattr(image, "nifti_header", image.header)["intent_code"])
    if 3000 <= intent < 3100:
        raise UnsupportedFormatError(path, f"CIFTI-2 file (intent code {intent}): grayordinate data, not an image")
    with reading(path, "cannot read NIfTI voxel data (truncated or corrupt)"):
        reader = NibabelReader(as_closest_canonical=True, mmap=False)
        data, _ = reader.get_data(reader.read(str(path)))
    return _volume_slices(data, source, "NIfTI")


def _read_itk(source: SourceFile) -> list[Slice]:
    """An NRRD or MetaImage volume, reoriented (as nibabel's `as_closest_canonical` does) to the NIfTI reader's
    orientation, so that the same volume gives the same slices in either format."""
    from nibabel.orientations import apply_orientation, io_orientation

    path = Path(source.path)
    with open(path, "rb") as f:
        kind = itk_kind(path, f.read(1024))
    data, affine = read_itk(path, kind)
    return _volume_slices(apply_orientation(data, io_orientation(affine)), source, kind)


def _volume_slices(data: np.ndarray, source: SourceFile, kind: str) -> list[Slice]:
    """The axial slices `data[:, :, k].T` of a canonical (x, y, z[, t]) volume, for every time point."""
    path = source.path
    if data.dtype.kind not in "fiub":
        raise UnsupportedFormatError(path, f"voxel type {data.dtype} (complex or RGB {kind}) is not supported")
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise UnsupportedFormatError(path, f"{data.ndim}-D {kind} data of shape {data.shape}: only 2D, 3D and 4D")
    if data.ndim == 3:
        return [_slice(data[None, :, :, k].transpose(0, 2, 1), source, k) for k in range(data.shape[2])]
    return [
        _slice(data[None, :, :, k, t].transpose(0, 2, 1), source, k, time_point=t)
        for t in range(data.shape[3])
        for k in range(data.shape[2])
    ]


def _read_image(source: SourceFile) -> list[Slice]:
    from monai.data import PILReader

    path = Path(source.path)
    reader = PILReader(converter=_single_or_rgb, reverse_indexing=False)
    with reading(path, "cannot decode image (truncated or corrupt)"):
        data, _ = reader.get_data(reader.read(str(path)))
    image = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    return [_slice(image, source, 0)]


def _single_or_rgb(image):
    """Keep grayscale modes (8/16/32-bit, float) as one channel; turn palette, alpha and CMYK images into RGB."""
    return image if image.mode in ("L", "I", "I;16", "I;16B", "F", "RGB") else image.convert("RGB")


def count_by_kind(errors: Iterable[DataError]) -> dict[str, int]:
    """How many errors of each kind (`unreadable`, `unsupported`, `not-an-image`)."""
    counts: dict[str, int] = defaultdict(int)
    for err in errors:
        counts[err.kind] += 1
    return dict(counts)
