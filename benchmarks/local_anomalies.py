"""Local anomalies in brain MR: what the gate stops, what its anomaly map finds, and how big and strong a defect must be
to be stopped (docs/ood.md, "Local anomalies"; docs/evidence.md section 7).

    python benchmarks/local_anomalies.py --checkpoint runs/<run>/model.pt --calibrate CALIB_DIR [--subjects 16]
        [--seed 57] [--train TRAIN/manifest.csv [--ddpm-steps 1000]] [--name local-anomalies]

A copy of the checkpoint is calibrated on the clean volumes below --calibrate (as `cdm-ood calibrate` does; no
anomalous example). --subjects new brain subjects of --seed (`anatomy.brain_volume`, the checkpoint's grid) are the
clean test volumes; each gets one anomaly of each kind of `cdm_ood.data.defects.LOCAL_ANOMALIES` (a bright and a
dark lesion, a signal void in a bright rim, a foreign object) at each radius and contrast, drawn into 3 neighbouring
slices with its mask. A variant differs from its clean volume only in the slices its anomaly touches, so only those
are scored again; each volume's verdict comes from the gate's own rule (`report.volume_rows`) with the calibrated
volume checks and the model's `gate.report_only`.

Prints the table block --name: per kind (radii 5, 7.5 and 10 mm pooled, contrast 0.3 of the volume's percentile
span), the volume-level AUROC and sample-level average precision (MOOD's) of the `local` and `foreign` statistics,
the fraction of volumes the gate stops as configured and with `local` stopping too, and the map's pixel AUROC over
the slices the anomaly touches, the fraction of volumes whose map peaks inside the anomaly, and the voxel-level
average precision (MOOD's: every voxel of the kind's anomalous and clean volumes); the clean volumes stopped, with a
95% Clopper-Pearson interval; the detection limit: the fraction stopped by the gate as configured at each radius
and contrast, per kind; and with --train, a MOOD-style table of sample- and voxel-level average precision beside the
DDPM reconstruction baseline of `benchmarks/ood_baselines.py`, trained on those scans with the same UNet budget.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from ood_baselines import RECON_STARTS, Benchmark, Reconstruction, train_ddpm
from real_scans import held_out, scorable
from sklearn.metrics import average_precision_score, roc_auc_score
from tables import emit, markdown, rate
from volume_checks import calibrated_copy

from cdm_ood.data.anatomy import FOV_MM, brain_volume
from cdm_ood.data.defects import LOCAL_ANOMALIES, draw_local_anomaly
from cdm_ood.data.manifest import manifest_sets
from cdm_ood.ood import OODDetector
from cdm_ood.ood.detectors import MapDetector
from cdm_ood.ood.metrics import localization_metrics
from cdm_ood.ood.report import COLUMNS, IN, judge, volume_rows
from cdm_ood.ood.volume_checks import check_statistics

RADII_MM = (2.5, 5.0, 7.5, 10.0)
CONTRASTS = (0.1, 0.2, 0.4, 0.8)
MAIN_RADII_MM, MAIN_CONTRAST = (5.0, 7.5, 10.0), 0.3


@dataclasses.dataclass
class Scored:
    """A volume's slice rows and anomaly maps (slices, H, W)."""

    rows: list[dict]
    maps: np.ndarray


def model_space(detector: OODDetector, volume: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """The slices `indices` of `volume` (slices, H, W) as the model sees them (B, 1, H, W)."""
    return torch.stack([torch.as_tensor(np.asarray(detector.transform(volume[k][None]))) for k in indices]).float()


def score_slices(detector: OODDetector, volume: np.ndarray, name: str, indices: np.ndarray) -> Scored:
    """The report rows and maps of the slices `indices` of `volume` (slices, H, W), scored as the gate scores them."""
    x = model_space(detector, volume, indices)
    features = detector.features(x, (*detector._needs(None), *MapDetector.needs))
    scores, statistics = detector.score_features(features), detector.statistics(features)
    maps = detector._map_detector().anomaly_maps(features).numpy()
    rows = []
    for j, k in enumerate(indices):
        verdict, reason = judge(float(scores[j]), detector.threshold)
        rows.append(dict.fromkeys(COLUMNS) | {"level": "slice", "path": name, "slice": int(k), "volume": name,
                                              "score": float(scores[j]), "threshold": detector.threshold,
                                              "verdict": verdict, "reason": reason}
                    | {c: float(v[j]) for c, v in statistics.items()})  # fmt: skip
    return Scored(rows, maps)


def with_anomaly(detector: OODDetector, clean: Scored, volume: np.ndarray, mask: np.ndarray, name: str) -> Scored:
    """`clean` with the slices that `mask` touches scored again from `volume`."""
    touched = np.flatnonzero(mask.any(axis=(1, 2)))
    new = score_slices(detector, volume, name, touched)
    rows = [r | {"path": name, "volume": name} for r in clean.rows]
    maps = clean.maps.copy()
    for j, k in enumerate(touched):
        rows[k], maps[k] = new.rows[j], new.maps[j]
    return Scored(rows, maps)


@dataclasses.dataclass
class Outcome:
    """What the gate made of one volume: stopped as configured, stopped with every check stopping, the `local` and
    `foreign` statistics; and, where kept, its maps and the anomaly's mask."""

    stopped: bool
    stopped_all: bool
    local: float
    foreign: float
    maps: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    baseline: Optional[np.ndarray] = None  # the DDPM reconstruction baseline's error maps (slices, H, W)


def outcome(scored: Scored, detector: OODDetector, mask: Optional[np.ndarray] = None, keep: bool = False) -> Outcome:
    """The gate's decisions and statistics of a scored volume (its maps and `mask` kept with `keep`)."""
    verdicts = []
    for checks in (detector.checks, [dataclasses.replace(c, stops=True) for c in detector.checks]):
        (row,) = volume_rows(scored.rows, detector.threshold, "mean", checks)
        verdicts.append(row["verdict"] != IN)
    stats = {c.name: max(check_statistics(scored.rows, c).values()) for c in detector.checks}
    return Outcome(*verdicts, stats["local"], stats["foreign"], scored.maps if keep else None, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--calibrate", required=True, type=Path, help="A folder of clean in-distribution volumes.")
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--seed", type=int, default=57)
    parser.add_argument("--train", type=Path, help="Manifest of the clean training scans: trains the DDPM baseline.")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="Training steps of the DDPM baseline.")
    parser.add_argument("--batch", type=int, default=32, help="Batch size of the DDPM baseline's training.")
    parser.add_argument("--recon-steps", type=int, default=50, help="DDIM levels of 1000 for its reconstructions.")
    parser.add_argument("--name", default="local-anomalies", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    detector, n = calibrated_copy(args.checkpoint, args.calibrate)
    if not {"local", "foreign"} <= {c.name for c in detector.checks}:
        parser.error(f"{args.calibrate}: the calibration holds no local-anomaly checks (docs/ood.md)")
    size = detector.model.spec.size[0]
    mm = FOV_MM / size
    recon, facts = None, ""
    if args.train is not None:
        train, val = (detector.prepare(s) for s in held_out(scorable(manifest_sets(args.train)["clean"])))
        data = Benchmark("local-anomalies", train, val, val, {}, detector.model.spec.bit_depth, 0)
        print(f"training the DDPM baseline on {len(train)} slices, {args.ddpm_steps} steps", flush=True)
        unet, seconds = train_ddpm(data, args.ddpm_steps, args.batch)
        recon = Reconstruction(unet, args.recon_steps)
        facts = (f" DDPM baseline (`benchmarks/ood_baselines.py`, the same UNet budget): trained on {len(train)} "
                 f"slices for {args.ddpm_steps} steps of batch {args.batch} ({seconds:.0f} s); its map is each "
                 f"pixel's squared reconstruction error averaged over {len(RECON_STARTS)} starting levels "
                 f"({recon.calls()} UNet calls per slice), its sample score the volume's largest.")  # fmt: skip
    rng = np.random.default_rng(args.seed)
    volumes = [brain_volume(rng, size, 24) for _ in range(args.subjects)]
    clean_scored = [score_slices(detector, v, f"clean-{i}", np.arange(len(v))) for i, v in enumerate(volumes)]
    clean = [outcome(s, detector, np.zeros(s.maps.shape, dtype=bool), keep=True) for s in clean_scored]
    if recon is not None:
        print(f"reconstructing {len(volumes)} clean volumes", flush=True)
        for o, v in zip(clean, volumes, strict=True):
            o.baseline = recon.error_maps(model_space(detector, v, np.arange(len(v))))
    found: dict[tuple[str, float, float], list[Outcome]] = {}
    settings = [(r, c) for r in RADII_MM for c in CONTRASTS] + [(r, MAIN_CONTRAST) for r in MAIN_RADII_MM]
    for kind in LOCAL_ANOMALIES:
        for radius, contrast in settings:
            for i, volume in enumerate(volumes):
                seed = int(np.random.SeedSequence([args.seed, i, round(radius * 10), round(contrast * 100)])
                           .generate_state(1)[0])  # fmt: skip
                bad, mask = draw_local_anomaly(volume, kind, radius / mm, contrast, seed, "mr")
                scored = with_anomaly(detector, clean_scored[i], bad, mask, f"{kind}-{i}")
                keep = contrast == MAIN_CONTRAST
                result = outcome(scored, detector, mask, keep)
                if keep and recon is not None:
                    touched = np.flatnonzero(mask.any(axis=(1, 2)))
                    result.baseline = clean[i].baseline.copy()
                    result.baseline[touched] = recon.error_maps(model_space(detector, bad, touched))
                found.setdefault((kind, radius, contrast), []).append(result)
            print(f"{kind}: radius {radius:g} mm, contrast {contrast:g} done", flush=True)
    main_rows, mood_rows = [], []
    for kind in LOCAL_ANOMALIES:
        pooled = [o for r in MAIN_RADII_MM for o in found[(kind, r, MAIN_CONTRAST)]]
        y = [0] * len(clean) + [1] * len(pooled)
        cells = []
        for check in ("local", "foreign"):
            s = [getattr(o, check) for o in clean + pooled]
            cells += [f"{roc_auc_score(y, s):.3f}", f"{average_precision_score(y, s):.3f}"]
        cells += [f"{np.mean([o.stopped for o in pooled]):.2f}", f"{np.mean([o.stopped_all for o in pooled]):.2f}"]
        touched = [(o.maps[k], o.mask[k]) for o in pooled for k in np.flatnonzero(o.mask.any(axis=(1, 2)))]
        pixel = localization_metrics([t[0] for t in touched], [t[1] for t in touched])["pixel_auroc"]
        peak = np.mean([o.mask.flat[np.argmax(o.maps)] for o in pooled])
        voxels = np.concatenate([o.maps.ravel() for o in clean + pooled])
        labels = np.concatenate([o.mask.ravel() for o in clean + pooled])
        cells += [f"{pixel:.3f}", f"{peak:.2f}", f"{average_precision_score(labels, voxels):.3f}"]
        main_rows.append([kind, *cells])
        if recon is not None:
            baseline = np.concatenate([o.baseline.ravel() for o in clean + pooled])
            largest = [float(o.baseline.max()) for o in clean + pooled]
            aps = [average_precision_score(y, [o.local for o in clean + pooled]),
                   average_precision_score(labels, voxels), average_precision_score(y, largest),
                   average_precision_score(labels, baseline)]  # fmt: skip
            mood_rows.append([kind, *(f"{ap:.3f}" for ap in aps)])
    limit_rows = [[kind, f"{c:g}", *(f"{np.mean([o.stopped for o in found[(kind, r, c)]]):.2f}" for r in RADII_MM)]
                  for kind in LOCAL_ANOMALIES for c in CONTRASTS]  # fmt: skip
    thresholds = "; ".join(f"{c.name} threshold {c.threshold:.3f}" + ("" if c.stops else " (reported only)")
                           for c in detector.checks)  # fmt: skip
    emit(args.name, "\n\n".join([
        f"{len(clean)} clean brain subjects (seed {args.seed}, {size}x{size} pixels of {mm:.2f} mm, 24 slices) and, "
        f"per kind, the same subjects with one anomaly of radius {', '.join(f'{r:g}' for r in MAIN_RADII_MM)} mm "
        f"(contrast {MAIN_CONTRAST} of the volume's percentile span) in 3 neighbouring slices; calibrated on {n} "
        f"slices below `{args.calibrate}` ({thresholds}).",
        markdown(["kind", "local AUROC", "local AP", "foreign AUROC", "foreign AP", "stopped (gate)",
                  "stopped (local stopping too)", "pixel AUROC", "peak in anomaly", "voxel AP"], main_rows),
        f"Clean volumes stopped: the gate {rate(sum(o.stopped for o in clean), len(clean))}; with `local` stopping "
        f"too {rate(sum(o.stopped_all for o in clean), len(clean))}.",
        "Detection limit: the fraction of volumes the gate (as configured) stops, by radius (mm) and contrast:",
        markdown(["kind", "contrast", *(f"{r:g} mm" for r in RADII_MM)], limit_rows),
        *([f"MOOD-style average precision, sample level (a volume's score: CDM the `local` statistic) and voxel level "
           f"(the maps' voxels of the kind's and the clean volumes).{facts}",
           markdown(["kind", "CDM sample AP", "CDM voxel AP", "DDPM reconstruction sample AP",
                     "DDPM reconstruction voxel AP"], mood_rows)] if mood_rows else []),
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
