"""Sharded, resumable scoring for archives: torchrun ranks score disjoint shares of the files and append
partial reports; rank 0 merges them into the one report a single process would write.

Partial reports are CSV files in `.<report name>.parts/` beside the report, each written atomically after a
batch of whole files; every row carries its file's key (size and modification time), so `--resume` skips
files that are already in a part and unchanged since, and a killed job loses at most the batch in flight.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Optional

from ..data.discovery import SourceFile, discover
from ..data.errors import DataError
from ..data.guards import MAX_VOXELS
from ..data.volumes import volume_groups
from ..data.walk import DEFAULT_IGNORE
from ..io import write_csv_atomic
from ..progress import ProgressFactory
from .api import OODDetector
from .batch import iter_scored, report_rows
from .map_outputs import MapWriter
from .report import COLUMNS, FLOAT_COLUMNS
from .volume_checks import VolumeCheck

PART_COLUMNS = (*COLUMNS, "file_key")
_INTS = ("slice", "time_point")
_OPTIONAL = (*_INTS, *FLOAT_COLUMNS, "volume", "sop_instance_uid")


def file_key(path: str | Path) -> str:
    """Size and modification time of a file: a changed file is scored again on resume."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def plan_shard(
    paths: Sequence[str | Path],
    parts: Path,
    rank: int,
    world: int,
    resume: bool,
    max_voxels: int = MAX_VOXELS,
    exclude: Optional[Callable[[Path], bool]] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    progress: Optional[ProgressFactory] = None,
) -> tuple[list[SourceFile], list[DataError], int, list[SourceFile]]:
    """This rank's share of the files below `paths` (the files of every `world`-th volume of the deterministic
    discovery order, so that a volume is read whole by one rank, and every `world`-th file that failed
    discovery), less those already in `parts` when resuming; returns
    (files to read, failed files to report, number skipped, every file discovered, the same on every rank).
    `max_voxels`, `exclude`, `ignore`, `progress` go to `discover`."""
    errors: list[DataError] = []
    sources = discover([Path(p) for p in paths], errors.append, max_voxels, exclude, ignore, progress)
    mine = [s for files in volume_groups(sources)[rank::world] for s in files]
    failed = errors[rank::world]
    done = done_files(parts) if resume and parts.exists() else set()
    if not done:
        return mine, failed, 0, sources
    todo = [s for s in mine if (s.path, file_key(s.path)) not in done]
    todo_failed = [e for e in failed if (str(e.path), file_key(e.path)) not in done]
    return todo, todo_failed, len(mine) + len(failed) - len(todo) - len(todo_failed), sources


def score_into_parts(
    detector: OODDetector,
    sources: Sequence[SourceFile],
    errors: Sequence[DataError],
    parts: Path,
    rank: int,
    workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    maps: Optional[MapWriter] = None,
) -> None:
    """Score files and save each completed batch of whole files as one partial report (and with `maps`, their
    anomaly maps)."""
    parts.mkdir(parents=True, exist_ok=True)
    for group in iter_scored(detector, sources, errors, workers, progress, maps):
        write_part(parts, rank, group)


def done_files(parts: Path) -> set[tuple[str, str]]:
    """(path, file key) of every file already in a partial report."""
    return {(r["path"], r["file_key"]) for r in read_parts(parts)}


def write_part(parts: Path, rank: int, rows: Iterable[dict]) -> Path:
    """One partial report of whole files, written atomically under a name no other write uses."""
    keyed = [dict(r, file_key=file_key(r["path"])) for r in rows]
    path = parts / f"rank{rank:04d}-{time.time_ns()}.csv"
    write_csv_atomic(path, PART_COLUMNS, [{k: "" if v is None else v for k, v in r.items()} for r in keyed])
    return path


def _typed(row: dict[str, str]) -> dict:
    out: dict = {k: None if k in _OPTIONAL and v == "" else v for k, v in row.items()}
    for k in _INTS:
        out[k] = int(out[k]) if out[k] is not None else None
    for k in FLOAT_COLUMNS:
        out[k] = float(out[k]) if out[k] is not None else None
    return out


def read_parts(parts: Path) -> list[dict]:
    """All rows of all partial reports (typed as the scorer made them), oldest part first."""
    rows = []
    for path in sorted(parts.glob("rank*.csv"), key=lambda p: int(p.stem.split("-")[1])):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows += [_typed(r) for r in csv.DictReader(f)]
    return rows


def merge(parts: Path, threshold: float, per_volume: str, checks: Sequence[VolumeCheck] = ()) -> list[dict]:
    """The full report from the partial ones: each file once (the newest rows of a file scored twice win),
    in the single-process order, then one row per volume."""
    newest: dict[str, list[dict]] = {}
    for r in read_parts(parts):
        newest.setdefault(r["path"], [])
        if newest[r["path"]] and newest[r["path"]][0]["file_key"] != r["file_key"]:
            newest[r["path"]] = []
        newest[r["path"]].append(r)
    rows = [{k: r[k] for k in COLUMNS} for group in newest.values() for r in group]
    unique = {(r["level"], r["path"], r["slice"], r["time_point"], r["volume"]): r for r in rows}
    return report_rows(list(unique.values()), threshold, per_volume, checks)


def clear(parts: Path) -> None:
    shutil.rmtree(parts, ignore_errors=True)
