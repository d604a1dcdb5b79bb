"""The gate's slice-order check (`cdm_ood.ood.slice_order`, docs/ood.md) measured on `make-phantoms --ood-sets`
volumes: the shape of a volume's per-slice -log p_0 (bits/dim) along its slice axis against the template of the
calibration volumes, which sees the orientation errors a slice model cannot see slice by slice (a superior-inferior
flip or interleaved slices give the same slices in another order).

    python benchmarks/slice_order.py --checkpoint runs/<run>/model.pt --calibrate CALIB_DIR --data OOD_DIR
        [--name slice-order]

A copy of the checkpoint is calibrated on the clean volumes below --calibrate (as `cdm-ood calibrate` does: every
detector and the check, half of the volumes held out, fpr 0.05; no OOD example), then every set of --data is
scored by the gate's own code (`cdm_ood.ood.batch.score_sources`). Prints the table block --name: volume-level
AUROC per set (its clean volumes in distribution) of the check's statistic and, for reference, of the `nll` and
default detectors' volume scores (the mean over slices), and the fraction of each set's volumes the gate does not
pass with and without the check.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tables import emit, markdown

from cdm_ood.data.discovery import discover
from cdm_ood.data.phantoms import manifest_sets
from cdm_ood.ood import OODDetector
from cdm_ood.ood.api import calibrate_checkpoint
from cdm_ood.ood.batch import score_sources
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.ood.report import IN, order_statistics, volume_rows


def scored(detector: OODDetector, paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """The report's slice rows and volume rows (with the check) of the files `paths`."""
    errors: list = []
    rows = score_sources(detector, discover(paths, errors.append), errors)
    return [r for r in rows if r["level"] == "slice"], [r for r in rows if r["level"] == "volume"]


def volume_statistics(detector: OODDetector, slices: list[dict]) -> dict[str, np.ndarray]:
    """Per volume: the check's statistic (0 for a volume too short to check: it passes), the mean bits/dim (`nll`)
    and the mean detector score."""
    volumes = sorted({r["volume"] for r in slices})
    found: dict[str, list[float]] = {"order": [], "nll": [], "score": []}
    for volume in volumes:
        members = [r for r in slices if r["volume"] == volume and r["score"] is not None]  # flagged slices: none
        found["order"].append(max(order_statistics(members, detector.order).values(), default=0.0))
        found["nll"].append(float(np.mean([r["bits_per_dim"] for r in members])))
        found["score"].append(float(np.mean([r["score"] for r in members])))
    return {k: np.array(v) for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--calibrate", required=True, type=Path, help="A folder of clean in-distribution volumes.")
    parser.add_argument("--data", required=True, type=Path, help="A folder made by make-phantoms --ood-sets.")
    parser.add_argument("--name", default="slice-order", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model.pt"
        shutil.copy(args.checkpoint, copy)
        detector, n = calibrate_checkpoint(copy, [args.calibrate])
    if detector.order is None:
        parser.error(f"{args.calibrate}: too few whole volumes to fit the slice-order check (docs/ood.md)")
    sets = {name: [Path(p) for p in paths] for name, paths in manifest_sets(args.data / "manifest.csv").items()}
    stats, passed = {}, {}
    for name, paths in sets.items():
        slices, volumes = scored(detector, paths)
        stats[name] = volume_statistics(detector, slices)
        without = volume_rows(slices, detector.threshold, "mean")
        passed[name] = [np.mean([r["verdict"] != IN for r in rows]) for rows in (without, volumes)]
    names = [k for k in sets if k != "clean"]
    labels = {"order": "slice order (statistic)", "nll": "nll (mean)", "score": f"{detector.name} (mean)"}
    auroc = [[label, *(f"{ood_metrics(stats['clean'][key], stats[k][key])['auroc']:.3f}" for k in names)]
             for key, label in labels.items()]  # fmt: skip
    gate = [[label, *(f"{passed[k][i]:.2f}" for k in sets)]
            for i, label in enumerate((detector.name, f"{detector.name} + slice order"))]  # fmt: skip
    clean = stats["clean"]["order"]
    emit(args.name, "\n\n".join([
        markdown(["volume-level AUROC", *names], auroc),
        f"Volumes not passed by the gate (threshold and check at fpr {detector.fpr}; `clean`: the false-positive "
        "rate):",
        markdown(["gate", *sets], gate),
        f"Calibrated on {n} slices of the volumes below `{args.calibrate}`; slice-order threshold "
        f"{detector.order.threshold:.4f}; {len(clean)} clean test volumes (statistic {clean.min():.3f}-"
        f"{clean.max():.3f}).",
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
