"""NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`), recognised by their text header and read through ITK
(`itk_io`, `cdm-ood[itk]`): the voxel budget from the header alone, the volume reoriented (as nibabel's
`as_closest_canonical` does) to the NIfTI reader's orientation, so that the same volume gives the same slices in
either format.
"""

from __future__ import annotations

from pathlib import Path

from ..guards import require_budget
from ..itk_io import data_file, header_shape, itk_kind, read_itk
from ..records import Slice, SourceFile
from .base import FormatReader, register_reader, volume_slices


@register_reader
class ItkReader(FormatReader):
    """NRRD and MetaImage volumes; a detached voxel file (the `.raw` of a `.mhd`) is read with its header."""

    name = "itk"
    title = "NRRD, MetaImage"
    canonical = True

    def detect_text(self, path: Path, head: bytes) -> bool:
        return itk_kind(path, head) is not None

    def source(self, path: Path, max_voxels: int) -> SourceFile:
        require_budget(path, header_shape(path, _kind(path)), max_voxels)
        voxels = data_file(path)
        return SourceFile(str(path), self.name, str(path), companions=(str(voxels),) if voxels else ())

    def slices(self, source: SourceFile) -> list[Slice]:
        from nibabel.orientations import apply_orientation, io_orientation

        path = Path(source.path)
        kind = _kind(path)
        data, affine = read_itk(path, kind)
        return volume_slices(apply_orientation(data, io_orientation(affine)), source, kind)


def _kind(path: Path) -> str:
    """'NRRD' or 'MetaImage', from the file's first 1024 bytes."""
    with open(path, "rb") as f:
        return itk_kind(path, f.read(1024))
