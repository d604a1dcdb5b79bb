"""`cdm-ood calibrate`, `cdm-ood score` and `cdm-ood evaluate`: the OOD gate and its evidence."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Optional

import click

from cdm_ood.errors import UsageError

from .common import (
    checkpoint_option,
    device_option,
    exit_code,
    ignore_globs,
    ignore_options,
    late_progress,
    mlflow_option,
    open_checkpoint,
    precision_option,
    setup_logging,
    stop_on_signals,
    tracking_uri_option,
)


class Workers(click.ParamType):
    """A number of DataLoader processes (0 or more), or `auto`."""

    name = "N|auto"

    def convert(self, value: object, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 0):
            return value
        try:
            n = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor 'auto'", param, ctx)
        if n < 0:
            self.fail(f"{n} is negative", param, ctx)
        return n


WORKERS = Workers()
MLFLOW_GALLERY = 50  # with --mlflow, the first this many map overlays (by name) are logged with the report

detector_option = click.option(
    "--detector", help="Detector by name, one of `cdm_ood.ood.DETECTORS` [default: the checkpoint's calibrated one]."
)
batch_option = click.option(
    "--batch-size", default=64, show_default=True, help="Slices (volumes for a 3D model) per forward pass."
)
workers_option = click.option(
    "--workers", default="auto", show_default=True, type=WORKERS,
    help="DataLoader processes reading files (0: in the main process; auto: from the cores torch leaves free on "
         "CPU, half the cores on GPU).",
)  # fmt: skip


def _scorer(
    checkpoint: Path, detector: Optional[str], batch_size: int, threshold: str | float = "auto", device: str = "cpu",
    precision: Optional[str] = None, volume_checks: Optional[Sequence[str]] = None,
):  # fmt: skip
    """The checkpoint's scorer and its thresholds, resolved once, now: an uncalibrated checkpoint (e.g. a
    `checkpoints/step_N.pt`) or an impossible threshold stops the command (exit 2) before any file is read."""
    from cdm_ood.errors import CdmOodError
    from cdm_ood.ood.scoring import ImageScorer
    from cdm_ood.ood.thresholds import Thresholds

    model = open_checkpoint(checkpoint, device)
    try:
        checks = {} if volume_checks is None else {"volume_checks": volume_checks}
        scorer = ImageScorer(model, detector, batch_size, precision=precision, **checks)
        return scorer, Thresholds.resolve(scorer, threshold)
    except CdmOodError as err:
        raise type(err)(f"{checkpoint}: {err}") from None


def _require_maps(scorer, checkpoint: Path) -> None:
    """Stop `score --maps` (exit 2) before any file is read when the checkpoint has no calibrated map detector."""
    from cdm_ood.ood.detectors import MapDetector

    calibration = scorer.model.calibration
    if calibration is None or MapDetector.name not in calibration.detectors:
        raise UsageError(f"{checkpoint}: --maps needs the calibrated {MapDetector.name!r} detector; calibrate the "
                         "checkpoint on in-distribution scans first (cdm-ood calibrate)")  # fmt: skip


def _skipped(err) -> None:
    """Report a file left out of calibration or evaluation (the command goes on)."""
    click.echo(f"skipped {err.path}: {err.reason}", err=True)


@click.command("calibrate")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@checkpoint_option
@click.option("--fpr", default=0.05, show_default=True, help="Target false-positive rate of the threshold.")
@detector_option
@batch_option
@device_option
@precision_option("float32", "; scoring then uses the same by default")
@ignore_options
@mlflow_option
@tracking_uri_option
def calibrate_command(
    data: tuple[Path, ...], checkpoint: Path, fpr: float, detector: Optional[str], batch_size: int, device: str,
    precision: str, exclude: tuple[str, ...], no_default_ignore: bool, mlflow: bool, tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """Fit the detectors on in-distribution scans DATA (files or folders) and store their thresholds in the
    checkpoint.

    Half of the volumes (series or files) are held out, whole, to set the threshold; with fewer than 1/fpr
    held-out slices the threshold means little, and a warning says so. A 3D model is calibrated on whole
    volumes. The checkpoint is rewritten atomically
    with the calibration added; its weights are unchanged.
    """
    from cdm_ood.ood.api import calibrate_checkpoint

    setup_logging()
    with ExitStack() as bars:
        scorer, n = calibrate_checkpoint(checkpoint, data, fpr, detector, batch_size, _skipped, device,
                                         late_progress(bars), ignore_globs(exclude, no_default_ignore),
                                         precision)  # fmt: skip
    checks = "".join(f", {check.name} threshold {check.threshold:.4g}" + ("" if check.stops else " (reported only)")
                     for check in scorer.checks)  # fmt: skip
    click.echo(f"calibrated on {n} {scorer.unit}s: {scorer.name} threshold {scorer.threshold:.4g}{checks} (fpr {fpr}) "
               f"stored in {checkpoint}")  # fmt: skip
    if mlflow:
        from cdm_ood.integrations.tracking import log_job_run

        info = {"checkpoint": str(checkpoint), "detector": scorer.name, "fpr": fpr, "precision": precision}
        log_job_run("calibrate", info, {"threshold": scorer.threshold, f"{scorer.unit}s": n}, [], tracking_uri)


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
                   "q95). Not used by a 3D model: it scores each whole volume.")  # fmt: skip
@click.option("--no-slice-order", is_flag=True,
              help="Do not check the slice order and direction of volumes (the calibrated checks flag a volume whose "
                   "per-slice likelihood along the slice axis is shaped unlike the calibration volumes' or like them "
                   "reversed: a flipped or interleaved series, but also one that covers other anatomy; "
                   "docs/ood.md).")  # fmt: skip
@click.option("--no-orientation", is_flag=True,
              help="Do not check the in-plane orientation of volumes (the calibrated check flags a volume whose "
                   "slices are, on average, unusually little more likely as given than mirrored or transposed: a "
                   "flipped, rotated or transposed series, but also one acquired in another plane; "
                   "docs/ood.md).")  # fmt: skip
@click.option("--no-anatomy", is_flag=True,
              help="Do not check the anatomy volumes cover (the calibrated check flags a volume whose body fills its "
                   "slices, along the slice axis, unlike the calibration volumes', or whose body is shaped unlike "
                   "theirs: a truncated field of view, a partial slab, coverage that ends early, a front-to-back "
                   "flip, but also a scan of another body part or protocol; docs/ood.md).")  # fmt: skip
@click.option("--no-local", is_flag=True,
              help="Do not check volumes for local anomalies (the calibrated `local` and `foreign` checks flag a "
                   "volume whose anomaly map peaks, anywhere or at extreme intensities, higher than the calibration "
                   "volumes' do: a foreign object, a signal void, a lesion; docs/ood.md).")  # fmt: skip
@click.option("--no-fail", is_flag=True, help="Exit 0 even when a scan is OOD or unreadable.")
@click.option("--max-voxels", type=click.IntRange(min=1),
              help="Refuse, unread and with the reason in the report, a file whose header declares more voxels "
                   "[default: 512^3].")  # fmt: skip
@click.option("--resume", is_flag=True,
              help="Keep the partial reports of an interrupted run and skip their files whose content is unchanged; "
                   "refused (exit 2) when the checkpoint, detector, threshold or options differ from that "
                   "run's.")  # fmt: skip
@click.option(
    "--series-context",
    is_flag=True,
    help="Add each volume's StudyInstanceUID, SeriesInstanceUID, Modality, SeriesNumber and "
    "SeriesDescription to the report (DICOM; off by default: descriptions can hold identifying text).",
)
@click.option("--maps", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each scored image's anomaly map into this folder: .npy on the image's grid, a PNG "
                   "overlay, and for NIfTI / DICOM series a _map.nii.gz with the input's geometry (docs/data.md). "
                   "Needs the calibrated map detector.")  # fmt: skip
@click.option("--html", "html", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the run's QA page, one self-contained HTML file (summary, histogram, volumes worst "
                   "first, montages and score profiles of the volumes that did not pass, unreadable files; "
                   "docs/ood.md) [default with --maps: beside the report, <report>.html].")  # fmt: skip
@click.option("--pseudonym-key", type=click.File("rb"),
              help="A file of secret bytes: the QA page names files and volumes by their keyed hash (HMAC-SHA256) "
                   "instead of their paths, for sharing.")  # fmt: skip
@device_option
@precision_option(None, " [default: the precision of the checkpoint's calibration]")
@batch_option
@workers_option
@ignore_options
@mlflow_option
@tracking_uri_option
def score_command(
    paths: tuple[Path, ...], checkpoint: Path, threshold: str, detector: Optional[str], out: Path, per_volume: str,
    no_slice_order: bool, no_orientation: bool, no_anatomy: bool, no_local: bool, no_fail: bool, max_voxels: int,
    resume: bool, series_context: bool, maps: Optional[Path], html: Optional[Path], pseudonym_key: Optional[BinaryIO],
    device: str, precision: Optional[str], batch_size: int,
    workers: int | str, exclude: tuple[str, ...], no_default_ignore: bool, mlflow: bool, tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """Score DICOM / NIfTI / NRRD / MetaImage / PNG scans (files or folders, recursively) and write a report.

    Every file gets a row (unreadable ones with their reason, ignored ones with the pattern), every slice a score
    and verdict, every volume/series a summary row; a 3D model scores each whole volume (one row per volume, no
    slice rows). Exit 0: all volumes in distribution; 1: a volume is OOD or flagged (a slice or volume with NaN/inf
    or constant pixels, or a score that is not finite), a file or folder is unreadable, or nothing was scored; 2:
    usage error, unusable checkpoint, unwritable --out, another run writing the same --out, or a --resume of
    another run's parts; 3: the run could not finish (Ctrl-C, SIGTERM, a full disk, a crashed reader process),
    with one `error:` line. A report left at --out by an earlier run is moved aside (<name>.previous.csv) first.

    Files that sit beside scans in folders (manifests, sidecars, DICOMDIR, READMEs: the default ignore list) and
    those matched by --exclude are not read, and each gets a row `ignored` naming the pattern; a file named on the
    command line always is read. The run's own outputs (report, histogram, partial reports) are never scored,
    also inside the scanned folder.

    Under torchrun each process scores every N-th file into partial reports beside the report, and
    rank 0 merges them; `--resume` continues an interrupted run without scoring its finished files again.
    """
    import torch.distributed as dist

    from cdm_ood.data.guards import MAX_VOXELS
    from cdm_ood.ood.batch import auto_workers
    from cdm_ood.ood.gate import run_gate, write_gate_page
    from cdm_ood.utils.distributed import Distributed

    started = time.perf_counter()
    ddp = Distributed.from_env()
    setup_logging(ddp.rank)
    key = _pseudonym_key(pseudonym_key)
    html = html or (out.with_suffix(".html") if maps is not None else None)
    stop_on_signals()
    off = {
        "slice-order": no_slice_order,
        "slice-direction": no_slice_order,
        "orientation": no_orientation,
        "anatomy": no_anatomy,
        "local": no_local,
        "foreign": no_local,
    }
    scorer, thresholds = _scorer(checkpoint, detector, batch_size, threshold, device, precision,
                                 [name for name, skip in off.items() if not skip])  # fmt: skip
    workers = auto_workers(scorer.device) if workers == "auto" else workers
    if maps is not None:
        _require_maps(scorer, checkpoint)
    if ddp.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only for the barriers; the scoring itself needs no communication
    with ExitStack() as bars:
        result = run_gate(
            scorer, thresholds, paths, out, per_volume, workers, max_voxels or MAX_VOXELS, resume,
            ignore=ignore_globs(exclude, no_default_ignore),
            progress=late_progress(bars, scorer.name) if ddp.main else None,
            info={"checkpoint": str(checkpoint), "precision": scorer.precision}, maps=maps,
            series_context=series_context, page=html,
        )  # fmt: skip
    if result is None:  # another rank of a torchrun job: rank 0 reports
        return
    code = exit_code(not (result.passed or no_fail))
    if html is not None:
        write_gate_page(result, html, scorer, _threshold_source(threshold, scorer.fpr), int(code),
                        time.perf_counter() - started, pseudonym_key=key)  # fmt: skip
    written = {**({"maps": str(maps)} if maps is not None else {}), **({"html": str(html)} if html else {})}
    click.echo(json.dumps({"report": str(result.report), "histogram": str(result.histogram), **written,
                           **result.summary}))  # fmt: skip
    if mlflow:
        from cdm_ood.integrations.tracking import log_job_run

        gallery = sorted(maps.glob("*_map.png"))[:MLFLOW_GALLERY] if maps is not None else []
        log_job_run("score", result.info, {**result.summary, "threshold": result.info["threshold"]},
                    [result.report, result.histogram, *([html] if html else []), *gallery], tracking_uri,
                    scorer.model)  # fmt: skip
    sys.exit(code)


def _pseudonym_key(source: Optional[BinaryIO]) -> Optional[bytes]:
    """The bytes of --pseudonym-key (at least 16 of them: a short key is a guessable one)."""
    if source is None:
        return None
    key = source.read()
    if len(key) < 16:
        raise click.BadParameter(f"{source.name}: a key of at least 16 bytes is needed, it has {len(key)}",
                                 param_hint="--pseudonym-key")  # fmt: skip
    return key


def _threshold_source(spec: str, fpr: Optional[float]) -> str:
    """How the threshold was set, in words: `--threshold auto`, `fpr:<x>` or a number."""
    if spec == "auto":
        return f"calibrated: false-positive rate {fpr:g} on held-out in-distribution images"
    if spec.startswith("fpr:"):
        return f"false-positive rate {spec[4:]} on the calibration's held-out in-distribution images"
    return "given as a number"


@click.command("evaluate")
@click.argument("id_paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@checkpoint_option
@click.option("--ood", "ood_sets", required=True, multiple=True, metavar="[NAME=]PATH",
              help="An OOD set (repeatable; a NAME given twice is the union of its paths). A `make-phantoms` "
                   "manifest.csv: one set per artifact and strength (with NAME=, one set of them all).")  # fmt: skip
@click.option("--out-dir", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("ood-eval"),
              show_default=True,
              help="Folder for metrics.csv, metrics.json, roc_*.png, hist_*.png and report.html.")  # fmt: skip
@batch_option
@device_option
@ignore_options
@mlflow_option
@tracking_uri_option
def evaluate_command(
    id_paths: tuple[Path, ...], checkpoint: Path, ood_sets: tuple[str, ...], out: Path, batch_size: int, device: str,
    exclude: tuple[str, ...], no_default_ignore: bool, mlflow: bool, tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """AUROC, FPR@95%TPR, AUPR-in/out of every detector on each OOD set (slice level; volume level for a 3D
    model), with ROC and histograms.

    ID_PATHS are the in-distribution test scans (files, folders, or a `make-phantoms` manifest.csv: its clean
    volumes).
    """
    from cdm_ood.ood.evaluation import evaluate_paths, format_table
    from cdm_ood.ood.qa_page import evaluation_page, write_page

    setup_logging()
    model = open_checkpoint(checkpoint, device)
    with ExitStack() as bars:
        rows = evaluate_paths(model, _id_paths(id_paths), _ood_sets(ood_sets), out, batch_size, on_error=_skipped,
                              progress=late_progress(bars),
                              ignore=ignore_globs(exclude, no_default_ignore))  # fmt: skip
    figures = sorted(out.glob("roc_*.png")) + sorted(out.glob("hist_*.png"))
    meta = {"checkpoint": str(checkpoint), "model": model.digest, "training run": model.training_run_id,
            "in-distribution": ", ".join(map(str, id_paths)), "OOD sets": ", ".join(ood_sets)}  # fmt: skip
    write_page(out / "report.html", evaluation_page("cdm-ood evaluate", meta, rows, figures))
    click.echo(format_table(rows))
    click.echo(f"written: {out}/metrics.csv, metrics.json, roc_*.png, hist_*.png, report.html")
    if mlflow:
        from cdm_ood.integrations.tracking import log_job_run

        metrics = {f"{r['detector']}.{r['ood_set']}.{k}": r[k] for r in rows for k in ("auroc", "fpr95")}
        log_job_run("evaluate", {"checkpoint": str(checkpoint)}, metrics, sorted(out.glob("*")), tracking_uri, model)


def _id_paths(paths: tuple[Path, ...]) -> list[Path]:
    """The in-distribution paths, a manifest standing for its clean volumes."""
    from cdm_ood.data.manifest import is_manifest, manifest_sets

    return [v for p in paths for v in (manifest_sets(p).get("clean", []) if is_manifest(p) else [p])]


def _ood_sets(specs: tuple[str, ...]) -> dict[str, list[Path]]:
    """`--ood [NAME=]PATH` values as named lists of paths: a repeated name is the union of its paths; a manifest
    without a name gives its corrupted sets, with a name all of them under that name."""
    from cdm_ood.data.manifest import is_manifest, manifest_sets

    named: dict[str, list[Path]] = {}
    for spec in specs:
        name, _, text = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(text)
        if not path.exists():
            raise UsageError(f"--ood {spec}: no such file or folder")
        if is_manifest(path):
            corrupted = {k: v for k, v in manifest_sets(path).items() if k != "clean"}
            if not corrupted:
                raise UsageError(
                    f"--ood {spec}: the manifest lists no corrupted volumes (make-phantoms --corrupt or --ood-sets)"
                )
            parts = {name: [p for v in corrupted.values() for p in v]} if name else corrupted
        else:
            parts = {name or path.name: [path]}
        for key, paths in parts.items():
            named.setdefault(key, []).extend(p for p in paths if p not in named.get(key, []))
    return named
