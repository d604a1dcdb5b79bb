"""The scoring report: one row per slice, per unreadable file and per volume, verdicts, and its files. A 3D
model scores whole volumes: its report has volume and file rows, no slice rows. A map that `score --maps` could not
write is a `flagged` file row of its volume (`map_failure_row`), and flags that volume.

Rows identify images by path, slice index, volume (SeriesInstanceUID or file; a part of a split series,
`data.series`, with its label and `series_part` saying why) and SOPInstanceUID only: no patient identifier is ever
read into a row. `with_context` adds the study and series context, on request only.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data.errors import DataError
from ..data.formats import CONTEXT_COLUMNS
from ..data.records import SliceSource, describe_flags
from ..data.volumes import volume_path
from ..data.walk import IgnoredFile
from ..errors import UsageError
from ..utils.io import atomic_write, write_csv_atomic
from .local_check import MAP_COLUMNS
from .volume_checks import STATISTICS, VolumeCheck, failed_checks

COLUMNS = ("level", "path", "slice", "time_point", "volume", "series_part", "sop_instance_uid", "score", "threshold",
           "verdict", "reason", *STATISTICS)  # fmt: skip

FLOAT_COLUMNS = ("score", "threshold", *STATISTICS)
IN, OOD, UNREADABLE, FLAGGED, IGNORED = "in", "ood", "unreadable", "flagged", "ignored"
FAILING = (OOD, UNREADABLE, FLAGGED)
NOT_SCORED = "not scored: "  # how the reason of an image that was not scored begins
MAX_REASONS = 3  # distinct reasons of flagged slices a volume row repeats
AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda s: float(np.max(s)),
    "mean": lambda s: float(np.mean(s)),
    "q95": lambda s: float(np.quantile(s, 0.95)),
}


def judge(
    score: Optional[float], threshold: float, flags: Sequence[str] = (), failed: Sequence[str] = ()
) -> tuple[str, str]:
    """(verdict, reason) of one image or volume, the one rule of every path (report, Python API, MONAI transform,
    served model, Spark): `flagged` when its header (`data.headers`: the field named), its pixels (NaN/inf,
    constant) or its score (NaN/inf) cannot be trusted, else `ood` above the threshold or when a volume check it
    must pass failed (`failed`: the checks' reasons), and `in` otherwise. Nothing that could not be scored is ever
    `in`."""
    if flags:
        return FLAGGED, f"{NOT_SCORED}{describe_flags(flags)}"
    if score is None or not math.isfinite(score):
        return FLAGGED, f"{NOT_SCORED}the model's score is not finite ({score})"
    reasons = [*(["score above threshold"] if score > threshold else []), *failed]
    return (OOD, "; ".join(reasons)) if reasons else (IN, "")


def slice_row(
    source: SliceSource, score: Optional[float], threshold: float, flags: Sequence[str] = (),
    statistics: Optional[Mapping[str, float]] = None,
) -> dict:  # fmt: skip
    """A scored slice (`in`/`ood`), or a `flagged` one (see `judge`; its score and statistics are left empty).
    `statistics` are the slice's `volume_checks.STATISTICS` where the detector's features hold them (bits/dim,
    orientation log-ratios); missing or non-finite ones are left empty."""
    verdict, reason = judge(score, threshold, flags)
    score, statistics = None if verdict == FLAGGED else score, statistics or {}
    kept = {c: None if verdict == FLAGGED or statistics.get(c) is None or not math.isfinite(statistics[c])
            else float(statistics[c]) for c in STATISTICS}  # fmt: skip
    return {
        "level": "slice", "path": source.path, "slice": source.index, "time_point": source.time_point,
        "volume": source.volume_id, "series_part": source.part or None, "sop_instance_uid": source.sop_instance_uid,
        "score": score,
        "threshold": threshold, "verdict": verdict, "reason": reason, **kept,
    }  # fmt: skip


def volume_row(
    source: SliceSource, score: Optional[float], threshold: float, flags: Sequence[str] = (),
    statistics: Optional[Mapping[str, float]] = None,
) -> dict:  # fmt: skip
    """A whole volume scored by a 3D model (`in`/`ood`), or `flagged` (see `judge`; its score is left empty); the
    part of a split series says so first in its reason."""
    row = slice_row(source, score, threshold, flags, statistics)
    return _part_first(row | {"level": "volume", "slice": None, "sop_instance_uid": None})


def _part_first(row: dict) -> dict:
    """A volume row whose reason begins with how its series was split, when it was."""
    return row | {"reason": "; ".join(filter(None, [row["series_part"], row["reason"]]))}


def error_row(err: DataError) -> dict:
    """A file that could not be read, with its specific reason."""
    return dict.fromkeys(COLUMNS) | {
        "level": "file", "path": str(err.path), "verdict": UNREADABLE, "reason": f"{type(err).__name__}: {err.reason}",
    }  # fmt: skip


def ignored_row(item: IgnoredFile) -> dict:
    """A file a folder walk left out (an ignore glob matched it): reported, so that what was not looked at shows,
    and counted in the summary; it neither passes nor fails the gate."""
    return dict.fromkeys(COLUMNS) | {"level": "file", "path": item.path, "verdict": IGNORED, "reason": item.reason}


def map_failure_row(source: SliceSource, reason: str, whole: bool = False) -> dict:
    """A map file that could not be written (`map_outputs.MapFailure`): a `flagged` file row of the image's volume
    (its slice, or with `whole` the volume's map file), which flags the volume's row (`flag_noted`)."""
    return dict.fromkeys(COLUMNS) | {
        "level": "file", "path": source.path, "slice": None if whole else source.index,
        "time_point": source.time_point, "volume": source.volume_id, "verdict": FLAGGED,
        "reason": f"map not written: {reason}",
    }  # fmt: skip


def flag_noted(rows: Sequence[dict]) -> list[dict]:
    """`rows` with every volume row of a volume that a flagged file row names (a map not written) `flagged`, the
    file rows' reasons first in its reason: an output asked for and not made never passes."""
    notes: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["level"] == "file" and row["verdict"] == FLAGGED and row["volume"] is not None:
            notes[row["volume"]].append(row["reason"])
    out = []
    for row in rows:
        if row["level"] == "volume" and row["volume"] in notes:
            reasons = [*dict.fromkeys(notes[row["volume"]]), *filter(None, [row["reason"]])]
            row = row | {"verdict": FLAGGED, "reason": "; ".join(reasons)}
        out.append(row)
    return out


def _why_flagged(members: Sequence[dict]) -> str:
    """The distinct reasons of a volume's flagged slices (at most `MAX_REASONS`), without `NOT_SCORED`."""
    reasons = list(dict.fromkeys(r["reason"].removeprefix(NOT_SCORED) for r in members if r["verdict"] == FLAGGED))
    more = f"; and {len(reasons) - MAX_REASONS} more" if len(reasons) > MAX_REASONS else ""
    return "; ".join(reasons[:MAX_REASONS]) + more


def aggregate(how: str) -> Callable[[np.ndarray], float]:
    """The per-volume aggregate named `how` (`AGGREGATES`); an unknown name is a usage error."""
    if how not in AGGREGATES:
        raise UsageError(f"unknown per-volume aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")
    return AGGREGATES[how]


def volume_rows(
    rows: Sequence[dict], threshold: float, how: str = "mean", checks: Sequence[VolumeCheck] = ()
) -> list[dict]:
    """One summary row per volume/series: the `how` aggregate (max, mean, q95) of its slice scores against the
    threshold; `flagged` when any of its slices could not be scored (a volume with unscored slices never
    passes; its reason repeats theirs, e.g. the header field that disagrees), with the aggregate of the others as
    its score. A volume that fails one of the calibrated volume `checks` (`volume_checks`: slice order,
    orientation, anatomy, local anomalies; per time point; volumes of fewer than `volume_checks.MIN_SLICES` slices
    are not checked) is `ood` too, with the check in its reason; one over a check that is reported only
    (`stops` False) keeps its verdict, the check in its reason. A volume's statistics are the means of its slices',
    the map peaks their largest. The reason of a part of a split series begins with the split (`series_part`)."""
    combine = aggregate(how)
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["level"] == "slice":
            groups[row["volume"]].append(row)
    out = []
    for volume, members in groups.items():
        scores = np.array([r["score"] for r in members if r["score"] is not None], dtype=np.float64)
        row = dict.fromkeys(COLUMNS) | {"level": "volume", "volume": volume, "threshold": threshold}
        row["path"], row["series_part"] = volume_path([r["path"] for r in members]), members[0].get("series_part")
        flagged = len(members) - len(scores)
        if len(scores) == 0:
            why = _why_flagged(members)
            out.append(_part_first(
                row | {"verdict": FLAGGED, "reason": f"no slice could be scored ({len(members)} flagged: {why})"}
            ))  # fmt: skip
            continue
        score = combine(scores)
        n_ood = sum(r["verdict"] == OOD for r in members)
        reason = f"{how} of {len(scores)} slice scores; {n_ood} slices above threshold"
        failed = failed_checks(members, [c for c in checks if c.stops])
        reported = failed_checks(members, [c for c in checks if not c.stops])
        noted = [f"reported only, not stopping: {r}" for r in reported]
        reason = "; ".join([reason, *failed, *noted])
        why = _why_flagged(members)  # "" when no slice is flagged
        verdict, _ = judge(score, threshold, [why] if flagged else (), failed)
        if flagged:
            reason = f"{flagged} of {len(members)} slices flagged ({NOT_SCORED}{why}); {reason}"
        found = {c: [r[c] for r in members if r.get(c) is not None and math.isfinite(r[c])] for c in STATISTICS}
        out.append(_part_first(row | {"score": score, "verdict": verdict, "reason": reason} |
                               {c: float((np.max if c in MAP_COLUMNS else np.mean)(v)) if v else None
                                for c, v in found.items()}))  # fmt: skip
    return out


def summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts per level and verdict (`file_ignored`: the files the ignore globs left out), and whether the gate
    passes: at least one volume scored, and no failing volume or unreadable file (a run that scored nothing never
    passes)."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[f"{row['level']}_{row['verdict']}"] += 1
    scored = any(r["level"] == "volume" and r["verdict"] in (IN, OOD) for r in rows)
    failing = any(r["verdict"] in FAILING for r in rows if r["level"] in ("volume", "file"))
    result: dict[str, Any] = {"passed": scored and not failing}
    if not scored:
        result["reason"] = "nothing was scored"
    return {**result, **dict(sorted(counts.items()))}


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def with_context(rows: Sequence[dict], context: Mapping[str, Mapping[str, Optional[str]]]) -> list[dict]:
    """`rows` with the study and series context of their volume (`data.formats.CONTEXT_COLUMNS`; `context`: volume
    id -> column -> value; empty for a file that could not be read or a volume without them). SeriesDescription can
    hold identifying text: this is on request only (`score --series-context`)."""
    return [row | {c: context.get(row["volume"], {}).get(c) for c in CONTEXT_COLUMNS} for row in rows]


def write_report(
    path: str | Path, rows: Sequence[dict], info: dict[str, Any], columns: Sequence[str] = COLUMNS
) -> Path:
    """CSV (rows only) or JSON (`info`, summary and rows), chosen by the suffix, written atomically; each row's
    `columns`."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        body = {**info, "summary": summary(rows), "rows": [{k: _clean(r[k]) for k in columns} for r in rows]}
        with atomic_write(path) as f:
            json.dump(body, f, indent=1)
    elif path.suffix.lower() == ".csv":
        rows = [{k: r[k] for k in columns} for r in rows]  # csv writes None as an empty cell
        write_csv_atomic(path, columns, rows, for_people=True)
    else:
        raise UsageError(f"{path}: the report must be .csv or .json")
    return path
