"""ITK volumes: NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`), read through MONAI's `ITKReader` with
the optional `itk` package (`pip install cdm-ood[itk]`). Recognised by content; the voxel budget is checked from
the header alone (ITK's ImageIO reads no voxels for it); a detached voxel file (the `.raw` of a `.mhd`, the data
file of a `.nhdr`) belongs to its header and is read with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import NotAnImageError, UnreadableFileError, UnsupportedFormatError
from .guards import reading

EXTRA = "cdm-ood[itk]"
HEADER_SUFFIXES = (".mhd", ".nhdr")  # headers whose voxels may lie in another file
MAX_DIMS = 16  # the most axes a MetaImage header may declare (4D with time is the most a scan uses)
_METAIO_FIELD = re.compile(rb"^[ \t]*(\w+)[ \t]*=[ \t]*([^\r\n]*)", re.M)
_NRRD_DATA_FILE = re.compile(rb"^data ?file:[ \t]*([^\r\n]*)", re.M)


def itk_kind(path: Path, head: bytes) -> Optional[str]:
    """'NRRD' or 'MetaImage' when `head` starts such a header, else None. A MetaIO file of another object type
    (a mesh, a tube, a transform) is a `NotAnImageError`."""
    if head.startswith(b"NRRD000"):
        return "NRRD"
    fields = dict(_metaio_fields(head))
    if not head.lstrip().split(b"=", 1)[0].strip().isalnum() or not ({b"ObjectType", b"NDims"} & fields.keys()):
        return None
    kind = fields.get(b"ObjectType", b"Image")
    if kind != b"Image":
        raise NotAnImageError(path, f"MetaIO {kind.decode('ascii', 'replace')[:40]} object, not an image")
    return "MetaImage"


def _metaio_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The `Key = value` lines of a MetaIO header (up to the binary data of a .mha)."""
    return [(m.group(1), m.group(2).strip()) for m in _METAIO_FIELD.finditer(head)]


def data_file(header: Path) -> Optional[Path]:
    """The detached voxel file that a `.mhd` or `.nhdr` header names; None for other files, for voxels inside
    the header (`LOCAL`) and for file lists or patterns."""
    if header.suffix.lower() not in HEADER_SUFFIXES or not header.is_file():
        return None
    try:
        with open(header, "rb") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    if header.suffix.lower() == ".mhd":
        names = [value for key, value in _metaio_fields(text) if key == b"ElementDataFile"]
    else:
        names = [m.group(1).strip() for m in _NRRD_DATA_FILE.finditer(text)]
    if len(names) != 1 or names[0].upper() in (b"LOCAL", b"LIST") or b"%" in names[0] or b" " in names[0]:
        return None
    return header.parent / names[0].decode("utf-8", "replace")


def _image_io(path: Path, kind: str):
    """A new ITK ImageIO for `kind`, chosen here and not by ITK from the suffix (a volume may have any name)."""
    try:
        import itk
    except ImportError:
        raise UnsupportedFormatError(path, f"{kind} volume: reading it needs ITK; install {EXTRA}") from None
    return (itk.NrrdImageIO if kind == "NRRD" else itk.MetaImageIO).New()


def header_shape(path: Path, kind: str) -> tuple[int, ...]:
    """The (z, y, x) or (y, x) shape the header declares, read by ITK without the voxels. A header whose
    detached voxel file is missing, and a vector or RGB image, are refused here."""
    voxels = data_file(path)
    if voxels is not None and not voxels.exists():
        raise UnreadableFileError(path, f"{kind} header without its voxel file {voxels.name}")
    if kind == "MetaImage":
        _require_dimensions(path)
    io = _image_io(path, kind)
    with reading(path, f"malformed {kind} header"):
        io.SetFileName(str(path))
        io.ReadImageInformation()
        shape = tuple(int(io.GetDimensions(i)) for i in reversed(range(io.GetNumberOfDimensions())))
        components = int(io.GetNumberOfComponents())
    if components != 1:
        raise UnsupportedFormatError(path, f"{kind} image with {components} components per voxel (vector or RGB) "
                                     "is not supported")  # fmt: skip
    return shape


def _require_dimensions(path: Path) -> None:
    """Refuse a MetaImage header whose NDims is not a whole number from 1 to `MAX_DIMS` before ITK reads it (ITK
    spins on a negative one)."""
    with open(path, "rb") as f:
        fields = dict(_metaio_fields(f.read(1 << 16)))
    ndims = fields.get(b"NDims", b"")
    if not ndims.isdigit() or not 1 <= int(ndims) <= MAX_DIMS:
        raise UnreadableFileError(
            path, f"malformed MetaImage header: NDims must be a whole number from 1 to {MAX_DIMS}"
        )


def read_itk(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The voxels in (x, y, z) index order and the RAS affine, read by MONAI's `ITKReader`."""
    io = _image_io(path, kind)
    from monai.data import ITKReader

    with reading(path, f"cannot read {kind} voxel data (truncated or corrupt)"):
        reader = ITKReader(imageio=io)
        data, meta = reader.get_data(reader.read(str(path)))
    return np.asarray(data), np.asarray(meta["affine"], dtype=float)
