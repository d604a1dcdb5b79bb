"""Throughput of `cdm-ood score` (discover, read DICOM, prepare, score, report) against the bare batched
scoring of the same detector on the same, already prepared tensors.

    python benchmarks/score_throughput.py --checkpoint runs/a/model.pt [runs/b/model.pt ...] [--volumes 16]
        [--size 256] [--workers auto 0 1 2] [--detector NAME] [--name score-throughput]

Generates a folder of CT phantom DICOM series (`--size` pixels square, mapped to each model's size by its preset as
any input is), then times, in one process, for each checkpoint, each DataLoader worker count (`auto`: `cdm-ood
score`'s default, `cdm_ood.ood.batch.auto_workers`) and each repeat:
1. bare: `OODDetector.score_prepared`, the detector's network passes and statistic in batches, on tensors prepared
   beforehand (the checkpoint's default detector unless --detector);
2. score: `score_sources` as `cdm-ood score` runs it with the same detector, from the files to the report rows,
   plus writing the CSV;
and prints the table block `--name`: slices/s of each (medians of the repeats) and their ratio (the aim is >= 0.8),
and per model where the time of scoring goes in-process (discovery, reading, preparing, scoring), in ms per slice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tables import emit, markdown

from cdm_ood.data.discovery import discover
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.data.readers import read_source
from cdm_ood.ood import OODDetector
from cdm_ood.ood.batch import auto_workers, score_sources
from cdm_ood.ood.report import write_report


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def score_folder(detector: OODDetector, folder: Path, report: Path, workers: int) -> list[dict]:
    """What `cdm-ood score` does with a folder: discover, score every source, write the report; its rows."""
    errors: list = []
    rows = score_sources(
        detector, detector.thresholds, discover(folder, on_error=errors.append), errors, workers=workers
    )
    write_report(report, rows, {})
    return rows


def phases(detector: OODDetector, folder: Path) -> tuple[torch.Tensor, dict[str, float]]:
    """The prepared batch of every slice under `folder`, and the seconds of each step that produced it."""
    sources, discovering = timed(discover, folder)
    slices, reading = timed(lambda: [s for source in sources for s in read_source(source)])
    x, preparing = timed(detector.prepare, [s.image for s in slices])
    _, scoring = timed(detector.score_prepared, x)
    return x, {"discover and group the series": discovering, "read and decode the files": reading,
               "preset and resize": preparing, f"`{detector.name}` scores": scoring}  # fmt: skip


def throughput(detector: OODDetector, folder: Path, workers: list[str], repeats: int) -> tuple[list[list], str]:
    """Table rows (workers, bare, score, ratio) of one model over the DICOM files in `folder`, and its time split."""
    counts = {w: auto_workers(detector.device) if w == "auto" else int(w) for w in workers}
    bare: dict[str, list[float]] = {w: [] for w in counts}
    full: dict[str, list[float]] = {w: [] for w in counts}
    split: list[dict[str, float]] = []
    x, _ = phases(detector, folder)  # warm-up
    n = len(x)
    for repeat in range(repeats):
        print(f"{detector!r}: repeat {repeat + 1} of {repeats}", file=sys.stderr, flush=True)
        split.append(phases(detector, folder)[1])
        for w, count in counts.items():
            bare[w].append(timed(detector.score_prepared, x)[1])
            rows, seconds = timed(score_folder, detector, folder, folder.parent / "report.csv", count)
            full[w].append(seconds)
            assert sum(r["level"] == "slice" for r in rows) == n, "every slice is scored"
    model = "x".join(map(str, detector.model.spec.size)) + f" {detector.model.spec.model.arch}"
    table = []
    for w, count in counts.items():
        b, f = n / statistics.median(bare[w]), n / statistics.median(full[w])
        ratio = f"{f / b:.2f}"
        table.append([model, f"auto (default): {count}" if w == "auto" else w, f"{b:.3g} slices/s",
                      f"{f:.3g} slices/s", f"**{ratio}**" if w == "auto" else ratio])  # fmt: skip
    where = ", ".join(f"{name} {1e3 * statistics.median(s[name] for s in split) / n:.2f}" for name in split[0])
    return table, f"{model}: {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, nargs="+")
    parser.add_argument("--volumes", type=int, default=16, help="DICOM series of 16 slices each.")
    parser.add_argument("--size", type=int, default=256, help="Pixels per side of the DICOM slices.")
    parser.add_argument("--workers", nargs="+", default=["auto", "0", "1", "2"], help="DataLoader worker counts.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detector", help="A calibrated detector [default: the checkpoint's default].")
    parser.add_argument("--name", default="score-throughput", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    detectors = [OODDetector.from_checkpoint(c, detector=args.detector, batch_size=args.batch_size)
                 for c in args.checkpoint]  # fmt: skip
    table, splits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        make_phantoms(folder, args.volumes, "dicom", size=args.size, slices=16, modality="ct", seed=1)
        (folder / "manifest.csv").unlink()
        for detector in detectors:
            rows, split = throughput(detector, folder, args.workers, args.repeats)
            table += rows
            splits.append(split)
    names = sorted({d.name for d in detectors})
    text = markdown(["model", "workers", "bare scoring", "`cdm-ood score`", "ratio"], table) + (
        f"\n\nDetector {', '.join(f'`{n}`' for n in names)}; {16 * args.volumes} DICOM slices of "
        f"{args.size}x{args.size}, batch {args.batch_size}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}. Where the time goes, in process, in ms per slice: {'; '.join(splits)}."
    )
    emit(args.name, text)


if __name__ == "__main__":
    main()
