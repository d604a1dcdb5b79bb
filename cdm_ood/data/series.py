"""Series assembly as a DICOM router does it (dcm2niix, ITK's GDCM series reader): the single-frame files of one
SeriesInstanceUID are one volume only when they are one acquisition. A series is split, in this order, by image
type (LOCALIZER slices apart), echo (EchoNumbers, else EchoTime), time point (TemporalPositionIdentifier),
orientation (ImageOrientationPatient, within `headers.IOP_TOLERANCE`), slice size (Rows, Columns) and pixel spacing
(PixelSpacing, to 1 micrometre); then a part in which some slice position occurs more than once is split by
AcquisitionNumber (a repeated acquisition; a sequential CT whose every rotation has its own number stays whole).

Each part is a volume of its own (`part_volume_id`), scored, checked and reported apart, with a reason naming the
split (`SeriesPart.reason`); a series that needs no split keeps its SeriesInstanceUID as its volume id.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Optional

from .headers import SeriesMember, describe_orientation, orientation_groups, plane

# Two slices are at the same position when their positions along the normal differ by less (mm).
POSITION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SeriesPart:
    """One volume of a split series: `label` (short, in its volume id: `echo2`, `localizer_axial`) and `reason`
    (the split in words, for the report)."""

    label: str
    reason: str


@dataclass(frozen=True)
class _Split:
    """A field a series is split by: its name in reasons, each member's key, and a key's label and description."""

    name: str
    keys: Callable[[Sequence[SeriesMember]], list[Hashable]]
    label: Callable[[Hashable], str]
    describe: Callable[[Hashable], str]


def _field(get: Callable[[SeriesMember], Hashable]) -> Callable[[Sequence[SeriesMember]], list[Hashable]]:
    return lambda members: [get(m) for m in members]


def _echo(m: SeriesMember) -> tuple[str, Optional[str]]:
    return ("EchoNumbers", m.echo_number) if m.echo_number is not None else ("EchoTime", m.echo_time)


def _orientations(members: Sequence[SeriesMember]) -> list[Hashable]:
    """(plane, group number, the group's first orientation) of each member (`headers.orientation_groups`)."""
    groups = orientation_groups([m.orientation for m in members])
    first = {g: m.orientation for g, m in reversed(list(zip(groups, members, strict=True)))}
    return [(plane(first[g]), g, first[g]) for g in groups]


def _orientation_label(key: Hashable) -> str:
    return f"{key[0]}{key[1] + 1}"


SPLITS = (
    _Split("image type", _field(lambda m: "LOCALIZER" in m.image_type),
           lambda k: "localizer" if k else "imaging",
           lambda k: "ImageType LOCALIZER" if k else "ImageType not LOCALIZER"),
    _Split("echo", _field(_echo),
           lambda k: f"echo{k[1] or 'none'}" if k[0] == "EchoNumbers" else f"te{k[1] or 'none'}",
           lambda k: f"{k[0]} {k[1]}" if k[1] is not None else "no EchoNumbers or EchoTime"),
    _Split("time point", _field(lambda m: m.temporal_position),
           lambda k: f"t{k or 'none'}",
           lambda k: f"TemporalPositionIdentifier {k}" if k is not None else "no TemporalPositionIdentifier"),
    _Split("orientation", _orientations, _orientation_label,
           lambda k: f"ImageOrientationPatient {describe_orientation(k[2])}"),
    _Split("slice size", _field(lambda m: m.size),
           lambda k: f"{k[0]}x{k[1]}", lambda k: f"Rows x Columns {k[0]}x{k[1]}"),
    _Split("pixel spacing", _field(lambda m: m.spacing),
           lambda k: f"px{k or 'none'}", lambda k: f"PixelSpacing {k} mm" if k is not None else "no PixelSpacing"),
)  # fmt: skip
ACQUISITION = _Split("repeated acquisition", _field(lambda m: m.acquisition),
                     lambda k: f"acq{k or 'none'}",
                     lambda k: f"AcquisitionNumber {k}" if k is not None else "no AcquisitionNumber")  # fmt: skip


def part_volume_id(series_uid: str, part: Optional[SeriesPart]) -> str:
    """The volume id of a part: the SeriesInstanceUID, with the part's label in brackets when the series was
    split (`1.2.840...[echo2]`)."""
    return series_uid if part is None else f"{series_uid}[{part.label}]"


def split_series(members: Sequence[SeriesMember]) -> list[tuple[Optional[SeriesPart], list[int]]]:
    """The volumes of one series (its `members` in series order): each part (None when the series is not split) with
    the indices of its members in that order; parts in the natural order of their descriptions (EchoNumbers 2
    before 10, LOCALIZER first)."""
    keys = {split: split.keys(members) for split in SPLITS}
    varying = [split for split in SPLITS if len(set(keys[split])) > 1]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(len(members)):
        groups[tuple(keys[split][i] for split in varying)].append(i)
    found: list[tuple[list[tuple[_Split, Hashable]], list[int]]] = []
    for key, indices in groups.items():
        named = list(zip(varying, key, strict=True))
        repeats = _repeated_acquisitions([members[i] for i in indices])
        if repeats is None:
            found.append((named, indices))
            continue
        by_acquisition: dict[Hashable, list[int]] = defaultdict(list)
        for i, acquisition in zip(indices, repeats, strict=True):
            by_acquisition[acquisition].append(i)
        found += [([*named, (ACQUISITION, a)], part) for a, part in by_acquisition.items()]
    if len(found) == 1:
        return [(None, found[0][1])]
    by = ", ".join(dict.fromkeys(split.name for named, _ in found for split, _ in named))
    described = sorted(((_describe(named), named, indices) for named, indices in found), key=lambda f: _natural(f[0]))
    return [(SeriesPart("_".join(split.label(key) for split, key in named),
                        f"series split by {by} into {len(found)} volumes: part {k}, {what}"), indices)
            for k, (what, named, indices) in enumerate(described, 1)]  # fmt: skip


def _describe(named: list[tuple[_Split, Hashable]]) -> str:
    return ", ".join(split.describe(key) for split, key in named)


def _natural(text: str) -> list[tuple[int, float | str]]:
    """Sort key of `text` with its numbers compared as numbers ('EchoNumbers 2' before 'EchoNumbers 10')."""
    return [(0, float(t)) if k % 2 else (1, t) for k, t in enumerate(re.split(r"(\d+(?:\.\d+)?)", text)) if t]


def _repeated_acquisitions(members: Sequence[SeriesMember]) -> Optional[list[Hashable]]:
    """The members' AcquisitionNumbers when some slice position occurs more than once and those numbers differ,
    else None (nothing to split)."""
    positions = Counter(round(m.along / POSITION_TOLERANCE) for m in members if m.along is not None)
    numbers = [m.acquisition for m in members]
    if not positions or max(positions.values()) < 2 or len(set(numbers)) < 2:
        return None
    return numbers
