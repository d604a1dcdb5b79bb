"""NIfTI-1/2 (`.nii`, `.nii.gz`, `.hdr`/`.img` pairs): recognised by the header's size and magic (a bare Analyze
7.5 header is refused: its orientation is ambiguous), the voxel budget and header flags (`headers.nifti_flags`)
read from the header alone, the volume read by MONAI's `NibabelReader` turned to its closest canonical (RAS)
orientation: axial slices `data[:, :, k].T`, for every time point of a 4D file. Derived files keep the input's
shape, voxel order, affine and header.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np

from ...utils.io import atomic_path
from ..errors import UnreadableFileError, UnsupportedFormatError
from ..guards import reading, require_budget
from ..headers import nifti_flags
from ..records import Slice, SourceFile
from .base import FormatReader, SliceKey, register_reader, volume_slices


@register_reader
class NiftiReader(FormatReader):
    """NIfTI volumes, also gzip-compressed."""

    name = "nifti"
    title = "NIfTI"
    canonical = True
    gzip = True
    suffix = ".nii.gz"

    def detect(self, path: Path, head: bytes) -> bool:
        magic = _nifti_magic(head)
        if magic is False:
            raise UnsupportedFormatError(path, "Analyze 7.5 header without NIfTI magic (orientation is ambiguous); "
                                         "convert it to NIfTI")  # fmt: skip
        return bool(magic)

    def detect_gzipped(self, path: Path, inner: bytes) -> bool:
        return bool(_nifti_magic(inner))

    def source(self, path: Path, max_voxels: int) -> SourceFile:
        companions: tuple[str, ...] = ()
        if not path.name.lower().endswith((".nii", ".nii.gz", ".hdr")):
            raise UnsupportedFormatError(path, "NIfTI content under another suffix: nibabel reads NIfTI only as "
                                         ".nii, .nii.gz or .hdr/.img; copy it to such a name")  # fmt: skip
        if path.suffix.lower() == ".hdr":
            img = path.with_suffix(".img")
            if not img.exists():
                raise UnreadableFileError(path, f"NIfTI header without its voxel file {img.name}")
            companions = (str(img),)
        shape, flags = _header(path)
        require_budget(path, shape, max_voxels)
        return SourceFile(str(path), self.name, str(path), companions=companions, flags=flags)

    def slices(self, source: SourceFile) -> list[Slice]:
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
        return volume_slices(data, source, self.title)

    def write_like(self, source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
        write_nifti_like(source, slices, out)

    def write_map(self, slices: dict[SliceKey, tuple[Path, str]], out: Path, depth: int) -> bool:
        """The slice maps in the input's shape, voxel order and affine (NaN where no slice has a map)."""
        ((_, source), *_) = slices.values()
        maps = {key: np.load(npy)[None] for key, (npy, _) in slices.items()}
        write_nifti_like(source, maps, out, background=np.nan)
        return True


def write_nifti_like(
    source: str | Path, slices: dict[SliceKey, np.ndarray], out: str | Path, background: Optional[float] = None
) -> None:
    """Write `slices` ((1, H, W) arrays in the readers' orientation, keyed by (time point, index)) as a float32
    NIfTI file `out` of the NIfTI `source`'s shape, voxel order, affine and header: the slices are put back into
    the closest canonical array, then into the input's voxel order. Voxels of missing slices keep the input's
    values, or are `background` when it is given (the input's voxels are then never read)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    image = nib.load(str(source))
    to_canonical = ornt_transform(io_orientation(image.affine), axcodes2ornt(("R", "A", "S")))
    if background is None:
        canonical = np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float32).copy()
    else:
        shape = image.shape if len(image.shape) > 2 else (*image.shape, 1)
        canonical = apply_orientation(np.full(shape, background, dtype=np.float32), to_canonical).copy()
    if canonical.ndim == 2:
        canonical = canonical[:, :, None]
    for (time_point, index), values in slices.items():
        target = canonical[:, :, index] if time_point is None else canonical[:, :, index, time_point]
        target[...] = values[0].T
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(image.affine))
    data = apply_orientation(canonical, back).reshape(image.shape)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    kind = nib.Nifti2Image if isinstance(image, nib.Nifti2Image) else nib.Nifti1Image
    with atomic_path(out) as tmp:
        tmp.write_bytes(gzip.compress(kind(data, image.affine, header).to_bytes()))


def _nifti_magic(head: bytes) -> Optional[bool]:
    """True for a NIfTI-1/2 header, False for a bare Analyze 7.5 header (its size, no NIfTI magic), else None."""
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if sizeof_hdr == 348 and len(head) >= 348:
            return head[344:348] in (b"n+1\x00", b"ni1\x00")
        if sizeof_hdr == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            return True
    return None


def _header(path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The shape a NIfTI header declares and its flags (`headers.nifti_flags`); only the header is read, also from
    a .nii.gz."""
    import nibabel as nib

    with reading(path, "malformed NIfTI header"):
        image = nib.load(str(path))
        return tuple(int(s) for s in image.shape), nifti_flags(path, type(getattr(image, "nifti_header", image.header)))
