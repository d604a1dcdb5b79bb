"""Throughput of `cdm-ood score` (discover, read DICOM, prepare, forward, report) against the bare batched
forward pass of the same model on the same, already prepared tensors.

    python benchmarks/score_throughput.py --checkpoint runs/demo/model.pt [--volumes 16] [--workers 2]

Generates a folder of CT phantom DICOM series (size = the model's), then times, in one process:
1. bare: `log_likelihood_profile` (the one forward pass) in batches, on tensors prepared beforehand;
2. score: `score_sources` as `cdm-ood score` runs it, from the files to the report rows, plus writing the CSV;
and prints slices/s of each and their ratio (the aim is >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cdm_ood.data.discovery import discover
from cdm_ood.data.phantoms import make_phantoms
from cdm_ood.data.readers import iter_slices
from cdm_ood.ood import OODDetector
from cdm_ood.ood.batch import score_sources
from cdm_ood.ood.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--volumes", type=int, default=16, help="DICOM series of 16 slices each.")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    detector = OODDetector.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
    size = detector.model.spec.size[-1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        make_phantoms(folder, args.volumes, "dicom", size=size, slices=16, modality="ct", seed=1)
        (folder / "manifest.csv").unlink()
        x = detector.prepare([s.image for s in iter_slices(folder)])
        n = len(x)
        detector.score_prepared(x[: args.batch_size])  # warm-up
        bare, full = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            detector.profile(x)
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            errors: list = []
            rows = score_sources(detector, discover(folder, on_error=errors.append), errors, workers=args.workers)
            write_report(Path(tmp) / "report.csv", rows, {})
            full.append(time.perf_counter() - start)
        assert sum(r["level"] == "slice" for r in rows) == n
    b, f = n / statistics.median(bare), n / statistics.median(full)
    threads = torch.get_num_threads()
    print(f"{n} slices of {size}x{size}, batch {args.batch_size}, {args.workers} workers, {threads} threads")
    print(f"bare forward: {b:8.1f} slices/s")
    print(f"cdm-ood score: {f:8.1f} slices/s")
    print(f"ratio: {f / b:.2f}")


if __name__ == "__main__":
    main()
