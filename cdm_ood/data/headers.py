"""Headers that disagree with themselves, found by discovery's header pass before any pixel is decoded: a DICOM
series whose slices differ in Rows/Columns or ImageOrientationPatient or share a SOPInstanceUID; a NIfTI file
whose qform and sform disagree or whose scaling (scl_slope, scl_inter) is undefined.

Each problem is a flag, a sentence naming the field (never header text that could identify a patient), carried by
the slices it concerns (`records.Slice.flags`): a flagged slice is never scored, so its volume is `flagged` and never
passes the gate. A series is judged as stored: it is not split into stacks of one geometry (as a DICOM router would),
because a consumer that stacks the SeriesInstanceUID gets the disagreeing slices too.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

# Two slices share an orientation when no direction cosine of their ImageOrientationPatient differs by more.
IOP_TOLERANCE = 1e-3
# qform and sform agree when no corner voxel of the volume lies further apart under the two than this fraction of the
# smallest voxel size (float32 quaternions round far below it).
QSFORM_TOLERANCE = 0.01
_PLANES = ("sagittal", "coronal", "axial")  # the plane whose normal is the patient's x, y or z axis


@dataclass(frozen=True)
class SeriesMember:
    """What the series checks read of one single-frame DICOM file: its SOPInstanceUID, (Rows, Columns) and
    ImageOrientationPatient (None when absent or not six numbers)."""

    uid: Optional[str]
    size: tuple[int, int]
    orientation: Optional[tuple[float, ...]]


def orientation_of(ds: Any) -> Optional[tuple[float, ...]]:
    """A DICOM header's ImageOrientationPatient as six floats, None when absent or malformed."""
    try:
        values = tuple(float(v) for v in ds.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        return None
    return values if len(values) == 6 and all(math.isfinite(v) for v in values) else None


def series_flags(members: Sequence[SeriesMember]) -> list[tuple[str, ...]]:
    """The header flags of each file of one series (in series order): a SOPInstanceUID that more than one file
    holds (every such file); Rows/Columns or an ImageOrientationPatient (beyond `IOP_TOLERANCE`) other than those of
    the series' largest group of one geometry (ties: the group of the earliest slice)."""
    uids = Counter(m.uid for m in members if m.uid)
    duplicate = (f"duplicate SOPInstanceUID: {sum(uids.values())} files of the series hold {len(uids)} "
                 "SOPInstanceUIDs")  # fmt: skip
    planes = _orientation_groups([m.orientation for m in members])
    geometry = Counter(zip((m.size for m in members), planes, strict=True))
    (size, plane), count = geometry.most_common(1)[0]
    usual = next(m.orientation for m, p in zip(members, planes, strict=True) if p == plane)
    usual_of = f"of {count} of the series' {len(members)} slices"
    flags = []
    for m, p in zip(members, planes, strict=True):
        found = [duplicate] if m.uid and uids[m.uid] > 1 else []
        if m.size != size:
            found.append(f"Rows x Columns {_size(m.size)} differ from the {_size(size)} {usual_of}")
        if p != plane:
            found.append(f"ImageOrientationPatient {_orientation(m.orientation)} differs from the "
                         f"{_orientation(usual)} {usual_of}")  # fmt: skip
        flags.append(tuple(found))
    return flags


def _orientation_groups(orientations: Sequence[Optional[tuple[float, ...]]]) -> list[int]:
    """A group number per orientation: equal within `IOP_TOLERANCE` of the group's first one (None: a group of
    its own)."""
    firsts: list[Optional[tuple[float, ...]]] = []
    groups = []
    for o in orientations:
        same = (k for k, f in enumerate(firsts) if (o is None) == (f is None) and (o is None or _close(o, f)))
        group = next(same, len(firsts))
        if group == len(firsts):
            firsts.append(o)
        groups.append(group)
    return groups


def _close(a: Sequence[float], b: Optional[Sequence[float]]) -> bool:
    return b is not None and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= IOP_TOLERANCE


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _orientation(o: Optional[tuple[float, ...]]) -> str:
    """'axial (1, 0, 0, 0, 1, 0)': the plane nearest the slice (oblique beyond about 37 degrees) and the cosines."""
    if o is None:
        return "absent or malformed"
    normal = np.abs(np.cross(o[:3], o[3:]))
    plane = _PLANES[int(np.argmax(normal))] if normal.max() >= 0.8 else "oblique"
    return f"{plane} ({', '.join(f'{round(v, 3) + 0.0:g}' for v in o)})"


def nifti_flags(path: Path, header_class: type) -> tuple[str, ...]:
    """The header flags of a NIfTI file, from its header as stored (nibabel's loaded header has forgotten its
    scaling): scl_slope 0 or not finite (nibabel then reads the voxels unscaled, without a word), scl_inter not
    finite, and a qform and sform, both set (codes > 0), that place a corner voxel further apart than
    `QSFORM_TOLERANCE` voxels."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        header = header_class.from_fileobj(f, check=False)
    flags = []
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope == 0 or not math.isfinite(slope):
        flags.append(f"NIfTI scl_slope is {slope:g}: the voxels' scaling is undefined (read unscaled)")
    if not math.isfinite(inter):
        flags.append(f"NIfTI scl_inter is {inter:g}: the voxels' scaling is undefined")
    codes = int(header["qform_code"]), int(header["sform_code"])
    if min(codes) > 0:
        flags += _qform_sform(header, codes)
    return tuple(flags)


def _qform_sform(header: Any, codes: tuple[int, int]) -> list[str]:
    """A flag when the qform and sform of `header` place a corner voxel further apart than the tolerance."""
    import nibabel as nib

    name = f"NIfTI qform (code {codes[0]}) and sform (code {codes[1]})"
    try:
        qform, sform = header.get_qform(), header.get_sform()
    except ValueError as err:  # quaternion parameters that describe no rotation
        return [f"{name}: the qform cannot be computed ({err})"]
    shape = (*header.get_data_shape()[:3], 1, 1, 1)[:3]
    corners = np.array([[*c, 1.0] for c in itertools.product(*((0, n - 1) for n in shape))]).T
    apart = float(np.linalg.norm((qform - sform)[:3] @ corners, axis=0).max())
    voxel = min((abs(float(z)) for z in header.get_zooms()[:3] if z), default=1.0)
    tolerance = QSFORM_TOLERANCE * voxel
    if apart <= tolerance:
        return []
    if not np.isfinite(qform).all() or not np.isfinite(sform).all():
        return [f"{name}: not finite"]
    axes = ["".join(nib.aff2axcodes(a)) for a in (qform, sform)]
    turned = f", axes {axes[0]} vs {axes[1]}" if axes[0] != axes[1] else ""
    return [f"{name} disagree: voxels up to {apart:.3g} mm apart (tolerance {tolerance:.3g} mm){turned}"]
