"""The QA gate as one library job: claim the report, score every file below the inputs (sharded under torchrun,
resumable), write the report and its histogram, and decide. `cdm-ood score` and `pipelines/qa_gate.py` call it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..data.errors import EmptyFolderError
from ..data.guards import MAX_VOXELS
from ..data.walk import DEFAULT_IGNORE
from ..distributed import Distributed
from ..errors import UsageError
from ..figures import plot_histogram
from ..progress import ProgressFactory
from .api import OODDetector
from .map_outputs import SCORE_DISPLAY, MapWriter
from .outputs import ReportFiles
from .report import IN, OOD, aggregate, summary, write_report
from .shards import clear, merge, plan_shard, score_into_parts

log = logging.getLogger("cdm_ood.gate")


@dataclass
class GateResult:
    """The report's rows, their summary (with `passed`) and the files written."""

    rows: list[dict]
    summary: dict[str, Any]
    report: Path
    histogram: Path
    info: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.summary["passed"])


def run_gate(
    detector: OODDetector,
    paths: Sequence[str | Path],
    report: str | Path,
    per_volume: str = "mean",
    workers: int = 0,
    max_voxels: int = MAX_VOXELS,
    resume: bool = False,
    exclude: Optional[Callable[[Path], bool]] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    nothing_new_ok: bool = False,
    progress: Optional[ProgressFactory] = None,
    info: Optional[dict[str, Any]] = None,
    maps: Optional[str | Path] = None,
) -> Optional[GateResult]:
    """Score the files below `paths` into `report` (.csv or .json, with `info` in a JSON report) and decide.

    The report's files are claimed first (`ReportFiles.claimed`: a writable folder, no other run on the same
    report) and never scored; `exclude(path)` leaves more files out (e.g. those already reported), and so do
    the name globs `ignore` in folders (`cdm_ood.data.walk.DEFAULT_IGNORE`: manifests, sidecars, ...). With
    `nothing_new_ok` (single process), inputs with no file left to score are no failure: nothing is written and
    None is returned. `progress(total, phase)` is called for the phases "reading headers" and "scoring" once
    their number of files is known; its result with each number of files handled (a progress bar's update).
    With `maps`, each scored image's anomaly map goes into that folder (`map_outputs`; never scored itself, and
    not one of the inputs).
    Under torchrun every rank calls this; rank 0 merges and returns the result, the other ranks return None.
    """
    report = Path(report)
    if report.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {report}: the report must be .csv or .json")
    if report.resolve() in {Path(p).resolve() for p in paths}:
        raise UsageError("--out must not be one of the inputs")
    maps = None if maps is None else Path(maps).resolve()
    if maps is not None and any(maps == Path(p).resolve() or maps in Path(p).resolve().parents for p in paths):
        raise UsageError(f"--maps {maps} must not be one of the inputs or hold one")
    ddp = Distributed.from_env()
    aggregate(per_volume)
    if nothing_new_ok and ddp.world > 1:
        raise UsageError("nothing_new_ok is for a single process")
    files = ReportFiles(report)

    def skip(path: Path) -> bool:
        in_maps = maps is not None and (path.resolve() == maps or maps in path.resolve().parents)
        return files.owns(path) or in_maps or (exclude is not None and exclude(path))

    with ExitStack() as claim:
        problem = None
        if ddp.main:
            try:
                claim.enter_context(files.claimed())
            except UsageError as err:
                problem = err
        problem = ddp.from_main(problem)  # every rank stops when rank 0 cannot claim the report
        if problem is not None:
            raise problem
        if ddp.main and not resume:
            clear(files.parts)
        ddp.barrier()
        todo, failed, skipped, found = plan_shard(paths, files.parts, ddp.rank, ddp.world, resume, max_voxels, skip,
                                                  ignore, progress if ddp.main else None)  # fmt: skip
        if skipped:
            log.info("rank %d: %d files already scored, skipped", ddp.rank, skipped)
        if nothing_new_ok:
            failed = [e for e in failed if not isinstance(e, EmptyFolderError)]
            if not todo and not failed:
                return None
        update = progress(len(todo), "scoring") if progress is not None and ddp.main else None
        writer = None if maps is None else MapWriter(maps, SCORE_DISPLAY, found)
        score_into_parts(detector, todo, failed, files.parts, ddp.rank, workers, update, writer)
        ddp.barrier()
        if not ddp.main:
            return None
        rows = merge(files.parts, detector.threshold, per_volume, detector.checks)
        checks = {check.name: check.threshold for check in detector.checks}
        meta = {**(info or {}), "detector": detector.name, "threshold": detector.threshold, "per_volume": per_volume,
                "volume_check_thresholds": checks, "processes": ddp.world, "max_voxels": max_voxels}  # fmt: skip
        write_report(files.report, rows, meta)
        clear(files.parts)
        scored = [r for r in rows if r["level"] == detector.unit and r["score"] is not None]
        histogram = plot_histogram(
            {v: [r["score"] for r in scored if r["verdict"] == v] for v in (IN, OOD)},
            files.histogram, detector.threshold, f"{detector.name} score ({detector.unit}s)",
        )  # fmt: skip
    return GateResult(rows, summary(rows), files.report, histogram, meta)
