"""Headers that disagree with themselves, found by discovery's header pass before any pixel is decoded: a DICOM
series whose files share a SOPInstanceUID, or some of whose slices have no ImageOrientationPatient; a NIfTI file
whose qform and sform disagree or whose scaling (scl_slope, scl_inter) is undefined.

Each problem is a flag, a sentence naming the field (never header text that could identify a patient), carried by
the slices it concerns (`records.Slice.flags`): a flagged slice is never scored, so its volume is `flagged` and never
passes the gate. Slices of one series that differ in image type, echo, time point, orientation, size or spacing are
not a problem of the header: `series` splits them into volumes, as a DICOM router does.
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
    """What series assembly (`series`) and the series checks read of one single-frame DICOM file: its
    SOPInstanceUID, (Rows, Columns), ImageOrientationPatient (None when absent or not six numbers), and the fields a
    series is split by, as header text made canonical (`dicom.header_text`; None when absent): ImageType's values,
    EchoNumbers, EchoTime, TemporalPositionIdentifier, AcquisitionNumber, PixelSpacing, and the slice's position
    along its normal (None without orientation and position)."""

    uid: Optional[str]
    size: tuple[int, int]
    orientation: Optional[tuple[float, ...]]
    image_type: tuple[str, ...] = ()
    echo_number: Optional[str] = None
    echo_time: Optional[str] = None
    temporal_position: Optional[str] = None
    acquisition: Optional[str] = None
    spacing: Optional[str] = None
    along: Optional[float] = None


def orientation_of(ds: Any) -> Optional[tuple[float, ...]]:
    """A DICOM header's ImageOrientationPatient as six floats, None when absent or malformed."""
    try:
        values = tuple(float(v) for v in ds.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        return None
    return values if len(values) == 6 and all(math.isfinite(v) for v in values) else None


def series_flags(members: Sequence[SeriesMember]) -> list[tuple[str, ...]]:
    """The header flags of each file of one series (in series order): a SOPInstanceUID that more than one file
    holds (every such file); no ImageOrientationPatient where other slices of the series have one."""
    uids = Counter(m.uid for m in members if m.uid)
    duplicate = (f"duplicate SOPInstanceUID: {sum(uids.values())} files of the series hold {len(uids)} "
                 "SOPInstanceUIDs")  # fmt: skip
    oriented = sum(m.orientation is not None for m in members)
    absent = (f"ImageOrientationPatient absent or malformed, where {oriented} of the series' {len(members)} slices "
              "have one")  # fmt: skip
    return [
        (*([duplicate] if m.uid and uids[m.uid] > 1 else []), *([absent] if m.orientation is None and oriented else []))
        for m in members
    ]


def orientation_groups(orientations: Sequence[Optional[tuple[float, ...]]]) -> list[int]:
    """A group number per orientation, in order of first appearance: equal within `IOP_TOLERANCE` of the group's
    first one (None: a group of its own)."""
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


def plane(o: Optional[tuple[float, ...]]) -> str:
    """The plane nearest a slice of ImageOrientationPatient `o`: axial, coronal, sagittal, or oblique beyond about
    37 degrees from each ('none' when absent or malformed)."""
    if o is None:
        return "none"
    normal = np.abs(np.cross(o[:3], o[3:]))
    return _PLANES[int(np.argmax(normal))] if normal.max() >= 0.8 else "oblique"


def describe_orientation(o: Optional[tuple[float, ...]]) -> str:
    """'axial (1, 0, 0, 0, 1, 0)': the plane nearest the slice and the cosines."""
    if o is None:
        return "absent or malformed"
    return f"{plane(o)} ({', '.join(f'{round(v, 3) + 0.0:g}' for v in o)})"


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
