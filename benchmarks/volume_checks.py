"""The gate's volume checks (`cdm_ood.ood.volume_checks`, docs/ood.md) measured on `make-phantoms --ood-sets` volumes
(artifacts, orientation and coverage errors, wrong modality): `slice-order`, the shape of a volume's per-slice
-log p_0 (bits/dim) along its slice axis, which sees what a slice model cannot see slice by slice (a
superior-inferior flip or interleaved slices give the same slices in another order), `slice-direction`, how much
better that shape matches the calibration template reversed than as given (a superior-inferior flip of a nearly
symmetric shape), `orientation`, the mean log-ratio of a volume's slices to their mirror images and transposes
(in-plane flips, rotations, swapped axes), `anatomy`, the body's extent along the slab and its shape (truncated
fields of view, partial slabs, early-ending coverage), and `local` and `foreign`, the anomaly map's largest peak over
the slices (anywhere, at extreme intensities), each against the calibration volumes.

    python benchmarks/volume_checks.py --checkpoint runs/<run>/model.pt --calibrate CALIB_DIR --data OOD_DIR
        [OOD_DIR ...] [--name volume-checks]

A copy of the checkpoint is calibrated on the clean volumes below --calibrate (as `cdm-ood calibrate` does: every
detector and check, half of the volumes held out, fpr 0.05 shared by the checks; no OOD example), then every set of
--data (pooled over the folders given: independent draws of the same sets, so that no single lucky draw of a few
volumes makes the table) is scored by the gate's own code (`cdm_ood.ood.batch.score_sources`). Prints the table
block --name: volume-level AUROC per set (its clean volumes in distribution) of each check's statistic and, for
reference, of the `nll` and default detectors' volume scores (the mean over slices), and the fraction of each set's
volumes the gate does not pass without the checks, with each one (stopping, also one the model reports only), and
with all (the gate as the model's `gate.report_only` configures it).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tables import emit, markdown, rate

from cdm_ood.data.discovery import discover
from cdm_ood.data.manifest import manifest_sets
from cdm_ood.ood import OODDetector
from cdm_ood.ood.api import calibrate_checkpoint
from cdm_ood.ood.batch import score_sources
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.ood.report import IN, volume_rows
from cdm_ood.ood.volume_checks import check_statistics


def scored(detector: OODDetector, paths: list[Path]) -> list[dict]:
    """The report's slice rows of the files `paths`."""
    errors: list = []
    return [
        r
        for r in score_sources(detector, detector.thresholds, discover(paths, errors.append), errors)
        if r["level"] == "slice"
    ]


def volume_statistics(detector: OODDetector, slices: list[dict]) -> dict[str, np.ndarray]:
    """Per volume: each check's statistic (the largest over time points; 0 for a volume too short to check: it
    passes), the mean bits/dim (`nll`) and the mean detector score."""
    found: dict[str, list[float]] = {**{c.name: [] for c in detector.checks}, "nll": [], "score": []}
    for volume in sorted({r["volume"] for r in slices}):
        members = [r for r in slices if r["volume"] == volume and r["score"] is not None]  # flagged slices: none
        for check in detector.checks:
            found[check.name].append(max(check_statistics(members, check).values(), default=0.0))
        found["nll"].append(float(np.mean([r["bits_per_dim"] for r in members])))
        found["score"].append(float(np.mean([r["score"] for r in members])))
    return {k: np.array(v) for k, v in found.items()}


def calibrated_copy(checkpoint: Path, folder: Path) -> tuple[OODDetector, int]:
    """The checkpoint's detector calibrated on the clean volumes below `folder` as `cdm-ood calibrate` does, on a
    temporary copy (the checkpoint stays as it is), and the number of slices it was calibrated on."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model.pt"
        shutil.copy(checkpoint, copy)
        return calibrate_checkpoint(copy, [folder])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--calibrate", required=True, type=Path, help="A folder of clean in-distribution volumes.")
    parser.add_argument("--data", required=True, type=Path, nargs="+", help="Folders made by make-phantoms --ood-sets.")
    parser.add_argument("--name", default="volume-checks", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    detector, n = calibrated_copy(args.checkpoint, args.calibrate)
    checks = detector.checks
    if len(checks) < 2:
        parser.error(f"{args.calibrate}: too few whole volumes to fit the volume checks (docs/ood.md)")
    stopping = [c.name for c in checks if c.stops]
    gates = {detector.name: (), **{f"{detector.name} + {c.name}" + ("" if c.stops else " (if it stopped)"):
                                   (dataclasses.replace(c, stops=True),) for c in checks},
             f"{detector.name} + all (the gate)": checks}  # fmt: skip
    sets: dict[str, list[list[Path]]] = {}
    for folder in args.data:
        for name, paths in manifest_sets(folder / "manifest.csv").items():
            sets.setdefault(name, []).append(paths)
    stats, stopped = {}, {}
    for name, draws in sets.items():
        # each draw scored on its own, as separate deliveries: the draws' copies of the same wrong-modality
        # file (one SOPInstanceUID) would otherwise form one series with a duplicated instance
        slices = [
            r | {"volume": f"{k}:{r['volume']}"} for k, paths in enumerate(draws) for r in scored(detector, paths)
        ]
        stats[name] = volume_statistics(detector, slices)
        if name == "clean":
            clean_slices = slices
        stopped[name] = [np.mean([r["verdict"] != IN for r in volume_rows(slices, detector.threshold, "mean", used)])
                         for used in gates.values()]  # fmt: skip
    names = [k for k in sets if k != "clean"]
    labels = {**{c.name: f"{c.name} (statistic)" for c in checks}, "nll": "nll (mean)",
              "score": f"{detector.name} (mean)"}  # fmt: skip
    auroc = [[label, *(f"{ood_metrics(stats['clean'][key], stats[k][key])['auroc']:.3f}" for k in names)]
             for key, label in labels.items()]  # fmt: skip
    gate = [[label, *(f"{stopped[k][i]:.2f}" for k in sets)] for i, label in enumerate(gates)]
    gate_clean = sum(r["verdict"] != IN for r in volume_rows(clean_slices, detector.threshold, "mean", checks))
    ranges = "; ".join(f"{c.name} threshold {c.threshold:.4f} (clean test volumes {stats['clean'][c.name].min():.3f}-"
                       f"{stats['clean'][c.name].max():.3f})" for c in checks)  # fmt: skip
    emit(args.name, "\n\n".join([
        markdown(["volume-level AUROC", *names], auroc),
        f"Volumes not passed by the gate (threshold at fpr {detector.fpr}, the {len(stopping)} checks that stop the "
        f"gate sharing it: {detector.fpr / len(stopping):.3g} each"
        + "".join(f"; `{c.name}` reported only, at the same rate" for c in checks if not c.stops)
        + "; `clean`: the false-positive rate):",
        markdown(["gate", *sets], gate),
        f"Clean test volumes the gate stops: {rate(gate_clean, len(stats['clean']['nll']))}.",
        f"Calibrated on {n} slices of the volumes below `{args.calibrate}`; {ranges}; {len(stats['clean']['nll'])} "
        f"clean test volumes, and as many of each set, below {', '.join(f'`{d}`' for d in args.data)}.",
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
