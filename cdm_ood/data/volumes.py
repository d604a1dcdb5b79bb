"""Whole volumes for 3D models: the slices of one volume id (a DICOM series, a NIfTI file; one volume per time
point of a 4D file) read by `readers` and stacked in index order into (C, D, H, W)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .discovery import ErrorHandler, PathLike, SourceFile, discover, report_error
from .errors import DataError, UnreadableFileError
from .formats import reader_of
from .guards import MAX_VOXELS
from .readers import iter_slices, read_source
from .records import Slice, SliceSource, Volume, header_flags, quality_flags
from .walk import DEFAULT_IGNORE


def volume_path(paths: Sequence[str]) -> str:
    """The path that names a volume: its file, or the folder of the first of its files (a DICOM series)."""
    paths = sorted(set(paths))
    return paths[0] if len(paths) == 1 else str(Path(paths[0]).parent)


def volume_groups(sources: Sequence[SourceFile]) -> list[list[SourceFile]]:
    """The discovered files grouped by volume id, in the order of each volume's first file."""
    groups: dict[str, list[SourceFile]] = defaultdict(list)
    for source in sources:
        groups[source.volume_id].append(source)
    return list(groups.values())


def volume_context(sources: Sequence[SourceFile]) -> dict[str, dict[str, Optional[str]]]:
    """The study and series context of each volume of `sources` (`FormatReader.context` of its first file; none
    where that file cannot be read now)."""
    context: dict[str, dict[str, Optional[str]]] = {}
    for files in volume_groups(sources):
        try:
            context[files[0].volume_id] = reader_of(files[0].format).context(files[0].path)
        except DataError:
            context[files[0].volume_id] = {}
    return context


def stack_volumes(slices: Sequence[Slice]) -> list[Volume]:
    """One `Volume` per time point of the slices of one volume id, slices in index order, with its slices' header
    flags (a volume with a flagged slice is never scored). Slices of different sizes raise `UnreadableFileError`
    naming the volume (a DICOM series is split by size before: `series`)."""
    by_time: dict[Optional[int], list[Slice]] = defaultdict(list)
    for s in slices:
        by_time[s.source.time_point].append(s)
    volumes = []
    for time_point, stack in by_time.items():
        stack.sort(key=lambda s: s.source.index)
        first, path = stack[0].source, volume_path([s.source.path for s in stack])
        flags = tuple(dict.fromkeys(f for s in stack for f in header_flags(s.flags)))
        shapes = sorted({s.image.shape for s in stack})
        if len(shapes) > 1:
            raise UnreadableFileError(path, f"its slices differ in size ({', '.join(map(str, shapes))}): not a volume")
        image = np.stack([s.image for s in stack], axis=1)
        where = SliceSource(path, 0, first.volume_id, time_point=time_point, part=first.part)
        volumes.append(Volume(image, where, (*flags, *quality_flags(image))))
    return volumes


def read_volume(files: Sequence[SourceFile], on_error: Optional[ErrorHandler] = None) -> list[Volume]:
    """The volumes (one per time point) of the files of one volume id. A volume with a file that cannot be read is
    not stacked: each such file goes to `on_error` (raised without it) and nothing is returned."""
    slices: list[Slice] = []
    failed = False
    for source in files:
        try:
            slices += read_source(source)
        except DataError as err:
            failed = True
            report_error(err, on_error)
    if failed or not slices:
        return []
    try:
        return stack_volumes(slices)
    except DataError as err:
        report_error(err, on_error)
        return []


def iter_volumes(
    paths: PathLike | Sequence[PathLike],
    on_error: Optional[ErrorHandler] = None,
    max_voxels: int = MAX_VOXELS,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> Iterator[Volume]:
    """All volumes below `paths`, as `readers.iter_slices` finds their slices (same order, errors and ignore list)."""
    for files in volume_groups(discover(paths, on_error, max_voxels, ignore=ignore)):
        yield from read_volume(files, on_error)


def iter_inputs(
    paths: PathLike | Sequence[PathLike],
    spatial_dims: int,
    on_error: Optional[ErrorHandler] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> Iterator[Slice] | Iterator[Volume]:
    """What a model of `spatial_dims` scores below `paths`: slices for 2D models, whole volumes for 3D ones."""
    if spatial_dims == 3:
        return iter_volumes(paths, on_error, ignore=ignore)
    return iter_slices(paths, on_error, ignore=ignore)
