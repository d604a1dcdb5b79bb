"""The scoring report: one row per slice, per unreadable file and per volume, verdicts, and its files. A 3D
model scores whole volumes: its report has volume and file rows, no slice rows.

Rows identify images by path, slice index, volume (SeriesInstanceUID or file) and SOPInstanceUID only:
no patient identifier is ever read into a row.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data.errors import DataError
from ..data.records import SliceSource
from ..data.volumes import volume_path
from ..errors import UsageError
from ..io import atomic_write, write_csv_atomic
from .slice_order import SliceOrderCheck, ordered_sequences

COLUMNS = ("level", "path", "slice", "time_point", "volume", "sop_instance_uid", "score", "threshold", "verdict",
           "reason", "bits_per_dim")  # fmt: skip
IN, OOD, UNREADABLE, FLAGGED = "in", "ood", "unreadable", "flagged"
FAILING = (OOD, UNREADABLE, FLAGGED)
AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda s: float(np.max(s)),
    "mean": lambda s: float(np.mean(s)),
    "q95": lambda s: float(np.quantile(s, 0.95)),
}


def judge(score: Optional[float], threshold: float, flags: Sequence[str] = ()) -> tuple[str, str]:
    """(verdict, reason) of one image, the same on every path (report, Python API, MONAI transform, served model):
    `flagged` when its pixels (NaN/inf, constant) or its score (NaN/inf) cannot be trusted, else `ood` above the
    threshold and `in` otherwise. Nothing that could not be scored is ever `in`."""
    if flags:
        return FLAGGED, f"not scored: {', '.join(flags)} pixels"
    if score is None or not math.isfinite(score):
        return FLAGGED, f"not scored: the model's score is not finite ({score})"
    return (OOD, "score above threshold") if score > threshold else (IN, "")


def slice_row(
    source: SliceSource, score: Optional[float], threshold: float, flags: Sequence[str] = (),
    bits_per_dim: Optional[float] = None,
) -> dict:  # fmt: skip
    """A scored slice (`in`/`ood`), or a `flagged` one (see `judge`; its score and bits/dim are left empty).
    `bits_per_dim` is -log p_0 of the slice (eq. 10 at t = 0) where the detector's features hold it."""
    verdict, reason = judge(score, threshold, flags)
    score = None if verdict == FLAGGED else score
    bits = None if verdict == FLAGGED or bits_per_dim is None or not math.isfinite(bits_per_dim) else bits_per_dim
    return {
        "level": "slice", "path": source.path, "slice": source.index, "time_point": source.time_point,
        "volume": source.volume_id, "sop_instance_uid": source.sop_instance_uid, "score": score,
        "threshold": threshold, "verdict": verdict, "reason": reason, "bits_per_dim": bits,
    }  # fmt: skip


def volume_row(
    source: SliceSource, score: Optional[float], threshold: float, flags: Sequence[str] = (),
    bits_per_dim: Optional[float] = None,
) -> dict:  # fmt: skip
    """A whole volume scored by a 3D model (`in`/`ood`), or `flagged` (see `judge`; its score is left empty)."""
    row = slice_row(source, score, threshold, flags, bits_per_dim)
    return row | {"level": "volume", "slice": None, "sop_instance_uid": None}


def error_row(err: DataError) -> dict:
    """A file that could not be read, with its specific reason."""
    return dict.fromkeys(COLUMNS) | {
        "level": "file", "path": str(err.path), "verdict": UNREADABLE, "reason": f"{type(err).__name__}: {err.reason}",
    }  # fmt: skip


def aggregate(how: str) -> Callable[[np.ndarray], float]:
    """The per-volume aggregate named `how` (`AGGREGATES`); an unknown name is a usage error."""
    if how not in AGGREGATES:
        raise UsageError(f"unknown per-volume aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")
    return AGGREGATES[how]


def volume_rows(
    rows: Sequence[dict], threshold: float, how: str = "mean", order: Optional[SliceOrderCheck] = None
) -> list[dict]:
    """One summary row per volume/series: the `how` aggregate (max, mean, q95) of its slice scores against the
    threshold; `flagged` when any of its slices could not be scored (a volume with unscored slices never
    passes), with the aggregate of the others as its score. With the calibrated slice-order check `order`, a
    volume whose slices' bits/dim along the slice axis (per time point) have a shape unlike the calibration
    volumes' is `ood` too (`slice_order`; volumes of fewer than `slice_order.MIN_SLICES` slices are not checked).
    A volume's bits/dim is the mean of its slices'."""
    combine = aggregate(how)
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["level"] == "slice":
            groups[row["volume"]].append(row)
    out = []
    for volume, members in groups.items():
        scores = np.array([r["score"] for r in members if r["score"] is not None], dtype=np.float64)
        row = dict.fromkeys(COLUMNS) | {"level": "volume", "volume": volume, "threshold": threshold}
        row["path"] = volume_path([r["path"] for r in members])
        flagged = len(members) - len(scores)
        if len(scores) == 0:
            out.append(row | {"verdict": FLAGGED, "reason": f"no slice could be scored ({len(members)} flagged)"})
            continue
        score = combine(scores)
        n_ood = sum(r["verdict"] == OOD for r in members)
        reason = f"{how} of {len(scores)} slice scores; {n_ood} slices above threshold"
        misordered = [] if order is None else _misordered(members, order)
        if misordered:
            reason += "; slice order unlike the calibration volumes: " + ", ".join(misordered)
        if flagged:
            verdict, reason = FLAGGED, f"{flagged} of {len(members)} slices flagged (not scored); {reason}"
        else:
            verdict = OOD if score > threshold or misordered else IN
        bits = [r["bits_per_dim"] for r in members if r.get("bits_per_dim") is not None]
        out.append(row | {"score": score, "verdict": verdict, "reason": reason,
                          "bits_per_dim": float(np.mean(bits)) if bits else None})  # fmt: skip
    return out


def order_statistics(members: Sequence[dict], order: SliceOrderCheck) -> dict[int, float]:
    """The slice-order statistic of each sequence (time point) of a volume's slice rows, from their bits/dim in slice
    order; sequences too short to check (`slice_order.MIN_SLICES`) are left out."""
    slots = [(r["time_point"] or 0, r["slice"]) if r["slice"] is not None else None for r in members]
    found = ordered_sequences([r.get("bits_per_dim") for r in members], slots)
    return {t: order.statistic(seq) for t, seq in sorted(found.items())}


def _misordered(members: Sequence[dict], order: SliceOrderCheck) -> list[str]:
    """The slice-order statistics of a volume's sequences (one per time point) above the check's threshold."""
    stats = order_statistics(members, order)
    return [f"statistic {s:.3g} > {order.threshold:.3g}" + (f" (time point {t})" if len(stats) > 1 else "")
            for t, s in stats.items() if s > order.threshold]  # fmt: skip


def summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts per level and verdict, and whether the gate passes: at least one volume scored, and no failing
    volume or unreadable file (a run that scored nothing never passes)."""
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


def write_report(path: str | Path, rows: Sequence[dict], info: dict[str, Any]) -> Path:
    """CSV (rows only) or JSON (`info`, summary and rows), chosen by the suffix, written atomically."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        body = {**info, "summary": summary(rows), "rows": [{k: _clean(r[k]) for k in COLUMNS} for r in rows]}
        with atomic_write(path) as f:
            json.dump(body, f, indent=1)
    elif path.suffix.lower() == ".csv":
        write_csv_atomic(path, COLUMNS, [{k: "" if r[k] is None else r[k] for k in COLUMNS} for r in rows])
    else:
        raise ValueError(f"{path}: the report must be .csv or .json")
    return path
