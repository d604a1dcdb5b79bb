"""The QA gate as one library job: claim the report, move the previous run's report aside, score every file below
the inputs (sharded under torchrun, resumable), write the report and its histogram, and decide. `cdm-ood score` and
`pipelines/qa_gate.py` call it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..data.errors import EmptyFolderError
from ..data.formats import CONTEXT_COLUMNS
from ..data.guards import MAX_VOXELS
from ..data.volumes import volume_context
from ..data.walk import DEFAULT_IGNORE
from ..errors import UsageError
from ..utils.distributed import Distributed
from ..utils.figures import plot_histogram
from ..utils.progress import ProgressFactory
from .dicom_results import write_parametric_maps, write_verdict_srs
from .map_outputs import SCORE_DISPLAY, MapFailure, MapWriter, map_stems, overlay_index
from .outputs import ReportFiles
from .qa_page import RunPage, write_page
from .report import (
    COLUMNS,
    IN,
    OOD,
    aggregate,
    flag_noted,
    ignored_row,
    map_failure_row,
    summary,
    with_context,
    write_report,
)
from .scoring import ImageScorer
from .shards import clear, merge, plan_shard, score_into_parts, start_parts
from .thresholds import Thresholds

log = logging.getLogger("cdm_ood.gate")


@dataclass
class GateResult:
    """The report's rows, their summary (with `passed`), the files written, and with maps each volume's slice
    overlays (`map_outputs.overlay_index`)."""

    rows: list[dict]
    summary: dict[str, Any]
    report: Path
    histogram: Path
    info: dict[str, Any]
    overlays: dict[str, list[tuple[int, Path]]]

    @property
    def passed(self) -> bool:
        return bool(self.summary["passed"])


def _noted(rows: list[dict], failures: Sequence[MapFailure]) -> list[dict]:
    """The report's rows with a `flagged` file row for each result file not written, before the volume rows, and
    those volumes `flagged` (`report.flag_noted`, on these failures only: earlier ones are in the reasons already)."""
    extra = [map_failure_row(f.source, f.reason, f.whole) for f in failures]
    return [*(r for r in rows if r["level"] != "volume"),
            *flag_noted([*extra, *(r for r in rows if r["level"] == "volume")])]  # fmt: skip


def run_identity(scorer: ImageScorer, thresholds: Thresholds, max_voxels: int, maps: Optional[Path]) -> dict[str, Any]:
    """What makes the rows of two runs comparable (`shards.start_parts`: a resume must match): the checkpoint's
    digest, the detector, its threshold and precision, the volume checks' thresholds, the voxel budget and the
    maps folder."""
    checks = {check.name: check.threshold for check in thresholds.checks}
    return {"checkpoint_digest": scorer.model.digest, "detector": scorer.name, "threshold": thresholds.score,
            "precision": scorer.precision, "volume_check_thresholds": checks, "max_voxels": max_voxels,
            "maps": None if maps is None else str(maps)}  # fmt: skip


def run_gate(
    scorer: ImageScorer,
    thresholds: Thresholds,
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
    series_context: bool = False,
    page: Optional[str | Path] = None,
) -> Optional[GateResult]:
    """Score the files below `paths` into `report` (.csv or .json, with `info` in a JSON report) and decide.

    The report's files are claimed first (`ReportFiles.claimed`: a writable folder, no other run on the same
    report) and never scored; a report and histogram left by an earlier run are moved aside at once
    (`ReportFiles.move_aside`), so that a run that fails leaves no old report where its own would be.
    `exclude(path)` leaves more files out (e.g. those already reported), and so do the globs `ignore` in folders
    (`cdm_ood.data.walk.DEFAULT_IGNORE`: manifests, sidecars, ...), each of those a row `ignored` in the report. A
    resume continues only the parts of a run with the same checkpoint digest, detector, threshold and options
    (`shards.start_parts`). With
    `nothing_new_ok` (single process), inputs with no file left to score are no failure: nothing is written and
    None is returned. `progress(total, phase)` is called for the phases "reading headers" and "scoring" once
    their number of files is known; its result with each number of files handled (a progress bar's update).
    With `maps`, each scored image's anomaly map goes into that folder (`map_outputs`; never scored itself, and
    not one of the inputs), and each DICOM volume's Parametric Map and verdict SR (`dicom_results`). With
    `series_context`, the report has the study and series columns of each volume (`data.formats.CONTEXT_COLUMNS`,
    read from one file of it). `page` is where the caller will write the run's QA page (`write_gate_page`): it is
    claimed, moved aside and never scored like the report.
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
    files = ReportFiles(report, None if page is None else Path(page))

    def skip(path: Path) -> bool:
        in_maps = maps is not None and (path.resolve() == maps or maps in path.resolve().parents)
        return files.owns(path) or in_maps or (exclude is not None and exclude(path))

    with ExitStack() as claim:
        identity = run_identity(scorer, thresholds, max_voxels, maps)
        problem = None
        if ddp.main:
            try:
                claim.enter_context(files.claimed())
                for moved in files.move_aside():
                    log.info("the previous run's output is moved aside to %s", moved)
                start_parts(files.parts, identity, resume)
            except UsageError as err:
                problem = err
        problem = ddp.from_main(problem)  # every rank stops when rank 0 cannot claim the report or resume its parts
        if problem is not None:
            raise problem
        plan = plan_shard(paths, files.parts, ddp.rank, ddp.world, resume, max_voxels, skip, ignore,
                          progress if ddp.main else None)  # fmt: skip
        if plan.skipped:
            log.info("rank %d: %d files already scored, skipped", ddp.rank, plan.skipped)
        failed = plan.failed
        if nothing_new_ok:
            failed = [e for e in failed if not isinstance(e, EmptyFolderError)]
            if not plan.todo and not failed:
                return None
        update = progress(len(plan.todo), "scoring") if progress is not None and ddp.main else None
        writer = None if maps is None else MapWriter(maps, SCORE_DISPLAY, plan.found)
        score_into_parts(scorer, thresholds, plan.todo, failed, files.parts, ddp.rank, workers, update, writer)
        ddp.barrier()
        if not ddp.main:
            return None
        ignored = [ignored_row(item) for item in plan.ignored]
        rows = merge(files.parts, thresholds, per_volume, plan.current, ignored)
        meta = {**(info or {}), **identity, "per_volume": per_volume, "processes": ddp.world}
        if maps is not None:  # the DICOM objects after the volumes' verdicts: a map not written flags its volume
            rows = _noted(rows, write_parametric_maps(rows, plan.found, maps)[1])
            rows = _noted(rows, write_verdict_srs(rows, plan.found, maps, meta)[1])
        if series_context:
            rows = with_context(rows, volume_context(plan.found))
        write_report(files.report, rows, meta, (*COLUMNS, *CONTEXT_COLUMNS) if series_context else COLUMNS)
        clear(files.parts)
        scored = [r for r in rows if r["level"] == scorer.unit and r["score"] is not None]
        histogram = plot_histogram(
            {v: [r["score"] for r in scored if r["verdict"] == v] for v in (IN, OOD)},
            files.histogram, thresholds.score, f"{scorer.name} score ({scorer.unit}s)",
        )  # fmt: skip
    overlays = {} if maps is None else overlay_index(maps, map_stems(plan.found))
    return GateResult(rows, summary(rows), files.report, histogram, meta, overlays)


def write_gate_page(
    result: GateResult, path: str | Path, scorer: ImageScorer, threshold_source: str, exit_code: Optional[int] = None,
    seconds: Optional[float] = None, title: str = "cdm-ood score", pseudonym_key: Optional[bytes] = None,
) -> Path:  # fmt: skip
    """The run's QA page (`qa_page`): its rows, how the threshold was set, the detector's calibration scores and
    the overlays of `result`."""
    meta = {
        **result.info,
        "threshold_source": threshold_source,
        "training_run": scorer.model.training_run_id,
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    page = RunPage(title, result.rows, meta, exit_code, seconds, scorer.id_scores, result.overlays,
                   pseudonym_key=pseudonym_key)  # fmt: skip
    return write_page(path, page)
