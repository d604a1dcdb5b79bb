"""Sharded, resumable scoring for archives: torchrun ranks score disjoint shares of the files and append
partial reports; rank 0 merges them into the one report a single process would write.

Partial reports are CSV files in `.<report name>.parts/` beside the report, each written atomically after a
batch of whole files; every row carries its file's key (a hash of its content), so `--resume` skips files that
are already in a part with the same content, and a killed job loses at most the batch in flight. The folder also
holds the run's identity (`RUN_FILE`: checkpoint digest, detector, threshold, ...): a resume under another one is
refused, and files that are no longer among the inputs are dropped from the merged report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..data.discovery import SourceFile, discover, voxel_file
from ..data.errors import DataError
from ..data.guards import MAX_VOXELS
from ..data.volumes import volume_groups, volume_path
from ..data.walk import DEFAULT_IGNORE, IgnoredFile
from ..errors import UsageError
from ..utils.io import atomic_write, write_csv_atomic
from ..utils.progress import ProgressFactory
from .batch import iter_scored, report_rows
from .map_outputs import MapWriter
from .report import COLUMNS, FLOAT_COLUMNS, UNREADABLE
from .scoring import ImageScorer
from .thresholds import Thresholds

PART_COLUMNS = (*COLUMNS, "file_key")
_INTS = ("slice", "time_point")
_OPTIONAL = (*_INTS, *FLOAT_COLUMNS, "volume", "series_part", "sop_instance_uid")
RUN_FILE = "run.json"
_CHUNK = 1 << 20
log = logging.getLogger("cdm_ood.shards")


def file_key(path: str | Path, content: bool = True) -> str:
    """What resume compares: a BLAKE2b hash of the file's bytes and of its voxel file's (the .img of a .hdr, the
    data file of a .mhd), so a file rewritten with other content is scored again whatever its size and time stamps
    say. Without `content` (a file that could not be read: reported as such, never passed), and for anything
    that is not a regular file (never opened: a FIFO would block), its type, size and modification time."""
    try:
        st = os.stat(path)
    except OSError as err:
        return f"missing:{err.errno}"
    if not content or not stat.S_ISREG(st.st_mode):
        return f"stat:{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.blake2b(digest_size=16)
    for file in (Path(path), voxel_file(Path(path))):
        if file is None:
            continue
        try:
            with open(file, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except OSError as err:
            digest.update(f"unreadable:{err.errno}".encode())
    return digest.hexdigest()


def start_parts(parts: Path, identity: Mapping[str, Any], resume: bool) -> None:
    """Prepare the folder of partial reports for a run of `identity` (JSON-able: what makes two runs' rows
    comparable). A fresh run clears it; a resume keeps it only when it was made by the same identity.

    Raises:
        UsageError: resuming parts of another identity (another checkpoint, detector, threshold, ...), or parts
            written before identities were stored.
    """
    stored = parts / RUN_FILE
    if resume and parts.exists() and any(parts.glob("rank*.csv")):
        try:
            before = json.loads(stored.read_text())
        except (OSError, ValueError):
            before = None
        changed = [k for k in identity if before is None or before.get(k) != identity[k]]
        if changed:
            what = "they record no run identity" if before is None else f"{', '.join(changed)} differ"
            raise UsageError(f"--resume: the partial reports in {parts} were made by another run ({what}); run "
                             "again without --resume to score everything anew")  # fmt: skip
        return
    clear(parts)
    parts.mkdir(parents=True)
    with atomic_write(stored) as f:
        json.dump(dict(identity), f, indent=1)


@dataclass
class Plan:
    """One rank's share of a run: files to read and failed files to report (less those already in the parts),
    how many were skipped as done, and, the same on every rank, every file discovered, every file left out by the
    ignore globs, and the paths of all inputs found now (the merge keeps only their rows)."""

    todo: list[SourceFile]
    failed: list[DataError]
    skipped: int
    found: list[SourceFile]
    ignored: list[IgnoredFile]
    current: set[str]


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
) -> Plan:
    """This rank's share of the files below `paths`: the files of every `world`-th volume of the deterministic
    discovery order (a volume is read whole by one rank) and every `world`-th file that failed discovery, less
    those already in `parts` with the same content when resuming. `max_voxels`, `exclude`, `ignore`, `progress`
    go to `discover`."""
    errors: list[DataError] = []
    ignored: list[IgnoredFile] = []
    sources = discover([Path(p) for p in paths], errors.append, max_voxels, exclude, ignore, progress, ignored.append)
    groups = volume_groups(sources)
    current = {s.path for s in sources} | {str(e.path) for e in errors}
    current |= {volume_path([s.path for s in files]) for files in groups}  # a 3D model's series row
    mine = [s for files in groups[rank::world] for s in files]
    failed = errors[rank::world]
    done = done_files(parts) if resume and parts.exists() else {}
    if not done:
        return Plan(mine, failed, 0, sources, ignored, current)
    todo = [s for s in mine if s.path not in done or file_key(s.path) not in done[s.path]]
    todo_failed = [e for e in failed if str(e.path) not in done or file_key(e.path, False) not in done[str(e.path)]]
    skipped = len(mine) + len(failed) - len(todo) - len(todo_failed)
    return Plan(todo, todo_failed, skipped, sources, ignored, current)


def score_into_parts(
    scorer: ImageScorer,
    thresholds: Thresholds,
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
    for group in iter_scored(scorer, thresholds, sources, errors, workers, progress, maps):
        write_part(parts, rank, group)


def done_files(parts: Path) -> dict[str, set[str]]:
    """The file keys of every path already in a partial report (only the paths found there are hashed again)."""
    done: dict[str, set[str]] = {}
    for r in read_parts(parts):
        done.setdefault(r["path"], set()).add(r["file_key"])
    return done


def write_part(parts: Path, rank: int, rows: Iterable[dict]) -> Path:
    """One partial report of whole files, written atomically under a name no other write uses."""
    rows = list(rows)
    unread = {r["path"] for r in rows if r["verdict"] == UNREADABLE}
    keys = {path: file_key(path, path not in unread) for path in {r["path"] for r in rows}}
    keyed = [dict(r, file_key=keys[r["path"]]) for r in rows]
    path = parts / f"rank{rank:04d}-{time.time_ns()}.csv"
    write_csv_atomic(path, PART_COLUMNS, keyed)  # None is written as an empty cell
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


def merge(
    parts: Path, thresholds: Thresholds, per_volume: str, current: Optional[set[str]] = None,
    extra: Sequence[dict] = (),
) -> list[dict]:  # fmt: skip
    """The full report from the partial ones and the `extra` rows (e.g. ignored files): each file once (the newest
    rows of a file scored twice win), only the files in `current` when given (a file gone since it was scored is
    dropped, and logged), in the single-process order, then one row per volume."""
    newest: dict[str, list[dict]] = {}
    for r in read_parts(parts):
        newest.setdefault(r["path"], [])
        if newest[r["path"]] and newest[r["path"]][0]["file_key"] != r["file_key"]:
            newest[r["path"]] = []
        newest[r["path"]].append(r)
    gone = [path for path in newest if current is not None and path not in current]
    if gone:
        log.warning("%d files of the partial reports are no longer among the inputs; their rows are dropped (e.g. "
                    "%s)", len(gone), gone[0])  # fmt: skip
    rows = [r for path, group in newest.items() if path not in gone for r in group]
    for r in rows:  # the rows as read, less their key: no second copy of an archive's rows
        del r["file_key"]
    unique = {(r["level"], r["path"], r["slice"], r["time_point"], r["volume"]): r for r in [*rows, *extra]}
    return report_rows(list(unique.values()), thresholds, per_volume)


def clear(parts: Path) -> None:
    shutil.rmtree(parts, ignore_errors=True)
