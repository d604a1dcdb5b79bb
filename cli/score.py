"""`cdm-ood calibrate`, `cdm-ood score` and `cdm-ood evaluate`: the OOD gate and its evidence."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import click

from cdm_ood.errors import UsageError

from .common import checkpoint_option, open_checkpoint, setup_logging, tracking_uri_option

detector_option = click.option(
    "--detector", help="Detector by name, one of `cdm_ood.ood.DETECTORS` [default: the checkpoint's calibrated one]."
)
batch_option = click.option("--batch-size", default=64, show_default=True, help="Slices per forward pass.")
workers_option = click.option(
    "--workers", default=0, show_default=True, help="DataLoader processes reading files (0: in the main process)."
)
tracking_option = click.option(
    "--mlflow/--no-mlflow", default=False, show_default=True, help="Log this run (report, figures) to MLflow."
)


def _detector(
    checkpoint: Path, detector: Optional[str], batch_size: int, threshold: str | float = "auto", device: str = "cpu"
):
    """The checkpoint's detector with its threshold resolved now: an uncalibrated checkpoint (e.g. a
    `checkpoints/step_N.pt`) or an impossible threshold stops the command (exit 2) before any file is read."""
    from cdm_ood.errors import CdmOodError
    from cdm_ood.ood import OODDetector

    model = open_checkpoint(checkpoint, device)
    try:
        scorer = OODDetector(model, detector, threshold=threshold, batch_size=batch_size)
        scorer.set_threshold(threshold)
    except CdmOodError as err:
        raise type(err)(f"{checkpoint}: {err}") from None
    return scorer


def _progress(total: int, label: str):
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)


def _skipped(err) -> None:
    """Report a file left out of calibration or evaluation (the command goes on)."""
    click.echo(f"skipped {err.path}: {err.reason}", err=True)


@click.command("calibrate")
@checkpoint_option
@click.option("--data", "data", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
              help="In-distribution validation scans (files or folders; repeatable).")  # fmt: skip
@click.option("--fpr", default=0.05, show_default=True, help="Target false-positive rate of the threshold.")
@detector_option
@batch_option
def calibrate_command(
    checkpoint: Path, data: tuple[Path, ...], fpr: float, detector: Optional[str], batch_size: int
) -> None:
    """Fit the detectors on in-distribution scans and store their thresholds in the checkpoint.

    The checkpoint is rewritten atomically with the calibration added; its weights are unchanged.
    """
    from cdm_ood.ood.api import calibrate_checkpoint

    setup_logging()
    scorer, n = calibrate_checkpoint(checkpoint, data, fpr, detector, batch_size, on_error=_skipped)
    click.echo(f"calibrated on {n} slices: {scorer.name} threshold {scorer.threshold:.4g} (fpr {fpr}) stored in "
               f"{checkpoint}")  # fmt: skip


@click.command("score")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@checkpoint_option
@click.option("--threshold", default="auto", show_default=True,
              help="auto (the calibrated fpr), fpr:<x> (e.g. fpr:0.01), or a number in score units.")  # fmt: skip
@detector_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("ood-report.csv"),
              show_default=True, help="Report, .csv or .json (written atomically).")  # fmt: skip
@click.option("--per-volume", default="mean", show_default=True,
              help="How slice scores make a volume's score, one of `cdm_ood.ood.report.AGGREGATES` (max, mean, "
                   "q95).")  # fmt: skip
@click.option("--no-fail", is_flag=True, help="Exit 0 even when a scan is OOD or unreadable.")
@click.option("--max-voxels", type=click.IntRange(min=1),
              help="Refuse, unread and with the reason in the report, a file whose header declares more voxels "
                   "[default: 512^3].")  # fmt: skip
@click.option("--resume", is_flag=True, help="Keep the partial reports of an interrupted run; skip their files.")
@click.option("--device", help="cpu, cuda or cuda:N [default: cuda:LOCAL_RANK when available, else cpu].")
@batch_option
@workers_option
@tracking_option
@tracking_uri_option
def score_command(
    paths: tuple[Path, ...], checkpoint: Path, threshold: str, detector: Optional[str], out: Path, per_volume: str,
    no_fail: bool, max_voxels: int, resume: bool, device: Optional[str], batch_size: int, workers: int,
    mlflow: bool, tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """Score DICOM / NIfTI / PNG scans (files or folders, recursively) and write a report.

    Every file gets a row (unreadable ones with their reason), every slice a score and verdict, every
    volume/series a summary row. Exit 0: all volumes in distribution; 1: a volume is OOD or flagged (a slice
    with NaN/inf or constant pixels, or a score that is not finite), a file or folder is unreadable, or nothing
    was scored; 2: usage error, unusable checkpoint, unwritable --out, or another run writing the same --out.

    The run's own outputs (report, histogram, partial reports) are never scored, also inside the scanned
    folder. Under torchrun each process scores every N-th file into partial reports beside the report, and
    rank 0 merges them; `--resume` continues an interrupted run without scoring its finished files again.
    """
    import torch
    import torch.distributed as dist

    from cdm_ood.data.guards import MAX_VOXELS
    from cdm_ood.distributed import Distributed
    from cdm_ood.ood.gate import run_gate

    ddp = Distributed.from_env()
    setup_logging(ddp.rank)
    device = device or (f"cuda:{ddp.local_rank}" if torch.cuda.is_available() else "cpu")
    scorer = _detector(checkpoint, detector, batch_size, threshold, device)
    if ddp.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only for the barriers; the scoring itself needs no communication
    with ExitStack() as bars:

        def progress_bar(total: int):
            return bars.enter_context(_progress(total, f"scoring ({scorer.name})")).update

        result = run_gate(
            scorer, paths, out, per_volume, workers, max_voxels or MAX_VOXELS, resume,
            progress=progress_bar if ddp.main else None, info={"checkpoint": str(checkpoint)},
        )  # fmt: skip
    if result is None:  # another rank of a torchrun job: rank 0 reports
        return
    click.echo(json.dumps({"report": str(result.report), "histogram": str(result.histogram), **result.summary}))
    if mlflow:
        from cdm_ood.tracking import log_job_run

        log_job_run("score", result.info, {**result.summary, "threshold": result.info["threshold"]},
                    [result.report, result.histogram], tracking_uri, scorer.model)  # fmt: skip
    sys.exit(0 if result.passed or no_fail else 1)


@click.command("evaluate")
@checkpoint_option
@click.option("--id", "id_paths", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
              help="In-distribution test scans (repeatable).")  # fmt: skip
@click.option("--ood", "ood_sets", required=True, multiple=True, help="NAME=PATH or PATH of an OOD set (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ood-eval"), show_default=True,
              help="Folder for metrics.csv, metrics.json, roc_<detector>.png, hist_<detector>.png.")  # fmt: skip
@batch_option
@tracking_option
@tracking_uri_option
def evaluate_command(
    checkpoint: Path, id_paths: tuple[Path, ...], ood_sets: tuple[str, ...], out: Path, batch_size: int, mlflow: bool,
    tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """AUROC, FPR@95%TPR, AUPR-in/out of every detector on each OOD set (slice level), with ROC and histograms."""
    from cdm_ood.ood.evaluation import evaluate_paths, format_table

    setup_logging()
    named = {}
    for spec in ood_sets:
        name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not Path(path).exists():
            raise UsageError(f"--ood {spec}: no such file or folder")
        named[name] = Path(path)
    model = open_checkpoint(checkpoint)
    rows = evaluate_paths(model, id_paths, named, out, batch_size, on_error=_skipped)
    click.echo(format_table(rows))
    click.echo(f"written: {out}/metrics.csv, metrics.json, roc_*.png, hist_*.png")
    if mlflow:
        from cdm_ood.tracking import log_job_run

        metrics = {f"{r['detector']}.{r['ood_set']}.{k}": r[k] for r in rows for k in ("auroc", "fpr95")}
        log_job_run("evaluate", {"checkpoint": str(checkpoint)}, metrics, sorted(out.glob("*")), tracking_uri, model)
