"""Slice order as a slice model sees it: the sequence of log p_0 (the `nll` score, bits/dim) of a volume's slices
along its slice axis, against the mean sequence of in-distribution volumes. A candidate volume-level check for the
orientation errors a slice model cannot see slice by slice (a superior-inferior flip or an interleaved slice order
gives the same slices in another order); not part of the gate.

    python benchmarks/slice_order.py --checkpoint runs/<run>/model.pt --fit TRAIN/manifest.csv --data OOD_DIR
        [--bins 16] [--name slice-order]

The template is fitted on the clean volumes of --fit only (in-distribution scans, e.g. the training subjects; no OOD
example): each volume's slice sequence is resampled to --bins positions over its length, centred and scaled to unit
norm, and the template is their mean. A volume's statistic is 1 minus the correlation of its resampled sequence
with the template. Prints the table block --name: volume-level AUROC per set of `make-phantoms --ood-sets` (its
clean volumes in distribution) for this statistic and, for reference, for the checkpoint's `nll` and default
detector with the mean over slices (`cdm_ood.ood.report.aggregate`).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from real_scans import volume_of
from tables import emit, markdown

from cdm_ood.data.phantoms import manifest_sets
from cdm_ood.data.readers import iter_slices
from cdm_ood.ood import OODDetector
from cdm_ood.ood.metrics import ood_metrics


def sequences(detector: OODDetector, paths: list[Path]) -> list[np.ndarray]:
    """Per volume below `paths`, the detector's scores of its scorable slices in slice order."""
    slices = [s for s in iter_slices(paths) if not s.flags]
    scores = detector.score(slices)
    volumes: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for image, score in zip(slices, scores, strict=True):
        volumes[volume_of(image)].append((image.source.index, float(score)))
    return [np.array([score for _, score in sorted(v)]) for v in volumes.values()]


def shape(sequence: np.ndarray, bins: int) -> np.ndarray:
    """The sequence resampled to `bins` positions over its length, centred, unit norm (zeros when flat or single)."""
    if len(sequence) < 2:
        return np.zeros(bins)
    resampled = np.interp(np.linspace(0, 1, bins), np.linspace(0, 1, len(sequence)), sequence)
    centred = resampled - resampled.mean()
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 0 else centred


def order_statistic(sequence: np.ndarray, template: np.ndarray) -> float:
    """1 - the correlation of a volume's resampled sequence with the template (0: the same shape; 2: reversed)."""
    return 1.0 - float(shape(sequence, len(template)) @ template)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--fit", required=True, type=Path, help="A manifest whose clean volumes fit the template.")
    parser.add_argument("--data", required=True, type=Path, help="A folder made by make-phantoms --ood-sets.")
    parser.add_argument("--bins", type=int, default=16, help="Positions the sequences are resampled to.")
    parser.add_argument("--name", default="slice-order", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    nll = OODDetector.from_checkpoint(args.checkpoint, detector="nll")
    default = OODDetector.from_checkpoint(args.checkpoint)
    fit = sequences(nll, manifest_sets(args.fit)["clean"])
    template = np.mean([shape(s, args.bins) for s in fit], axis=0)
    template /= np.linalg.norm(template)
    sets = {name: [Path(p) for p in paths] for name, paths in manifest_sets(args.data / "manifest.csv").items()}
    scores: dict[str, dict[str, np.ndarray]] = {"slice order (nll sequence)": {}, "nll (mean)": {},
                                                f"{default.name} (mean)": {}}  # fmt: skip
    for name, paths in sets.items():
        by_nll = sequences(nll, paths)
        scores["slice order (nll sequence)"][name] = np.array([order_statistic(s, template) for s in by_nll])
        scores["nll (mean)"][name] = np.array([s.mean() for s in by_nll])
        scores[f"{default.name} (mean)"][name] = np.array([s.mean() for s in sequences(default, paths)])
    names = [k for k in sets if k != "clean"]
    rows = [[statistic, *(f"{ood_metrics(found['clean'], found[k])['auroc']:.3f}" for k in names)]
            for statistic, found in scores.items()]  # fmt: skip
    fitted = scores["slice order (nll sequence)"]["clean"]
    emit(args.name, markdown(["volume-level AUROC", *names], rows) + (
        f"\n\nTemplate from {len(fit)} in-distribution volumes of `{args.fit}` at {args.bins} positions; "
        f"{len(sets['clean'])} clean test volumes (statistic {fitted.min():.3f}-{fitted.max():.3f})."
    ))  # fmt: skip


if __name__ == "__main__":
    main()
