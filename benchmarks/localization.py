"""Where is a scan out of distribution: anomaly maps of the CDM on CT phantoms with local defects of known mask.

    python benchmarks/localization.py [--steps 1000] [--volumes 24,4,4] [--seed 0] [--development]

The CDM of `benchmarks/ood_baselines.py` (same data, architecture and budget) is trained on clean 32x32 phantom
slices; its `map` detector is fitted on the validation slices. Each test volume then gets one defect of each kind
of `cdm_ood.data.defects` (metal with streaks, lesion, foreign object, local ghost) with its mask. Per kind, over
the slices the defect touches: pixel-level AUROC of the map (`MapDetector.anomaly_maps`, the map `score --maps`
writes) against the mask, also unsmoothed and, for comparison, of the detection map (`MapDetector.maps`, per-pixel
standardised) smoothed alike, and the fraction of maps whose peak lies inside the mask
(`cdm_ood.ood.metrics.localization_metrics`); and the slice-level AUROC of the `map` and `combined` detectors
against the clean test slices.

`--development` first draws the defects on 4 volumes of another seed (a development set, never reported) and prints
the mean pixel AUROC over the defect kinds for each candidate width of the maps' Gaussian smoothing and each
standardisation of the errors (pooled over pixels or per pixel): the set on which `MapDetector.smoothing` and the
pooled standardisation of `MapDetector.anomaly_maps` were chosen. Prints a markdown table, saves a gallery of
overlays (image, map, mask per row) and logs everything to MLflow (experiment `cdm-ood-localization`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ood_baselines import atomic_text, model_space, phantom_benchmark, train_benchmark_cdm
from tables import emit

from cdm_ood.data.defects import DEFECTS, draw_defect
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.presets import ct_preset
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.ood.detectors import DETECTORS, required_features, smoothed
from cdm_ood.ood.features import batched_features
from cdm_ood.ood.map_outputs import overlay
from cdm_ood.ood.metrics import localization_metrics, ood_metrics
from cdm_ood.utils.figures import save_png

DETECTED = ("map", "combined")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of the CDM.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--volumes", default="24,4,4", help="Phantom volumes (16 slices) for train,val,test.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=Path, default=Path("docs/img"))
    parser.add_argument("--out", type=Path, default=Path("runs/localization"), help="Table (markdown, JSON).")
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the run to MLflow.")
    parser.add_argument(
        "--development",
        action="store_true",
        help="Choose the maps' smoothing and standardisation on a development set.",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    volumes = tuple(int(v) for v in args.volumes.split(","))
    data = phantom_benchmark(volumes, args.seed)
    print(f"training the CDM, {args.steps} steps", flush=True)
    model, schedule, _, seconds = train_benchmark_cdm(data, args.steps, args.batch)
    needs = required_features(DETECTED, None)

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return batched_features(model, x.split(100), schedule, needs)

    num_dims = data.train[0].numel()
    detectors = {name: DETECTORS[name](num_dims, data.bit_depth).fit(features(data.val)) for name in DETECTED}
    if args.development:
        choose_smoothing(detectors["map"], features, args.seed)
    clean = features(data.test)
    clean_scores = {name: d.score(clean).numpy() for name, d in detectors.items()}
    stacks = data.test_volumes
    rows, gallery = [], []
    for kind in DEFECTS:
        drawn = [draw_defect(v, kind, 1000 * args.seed + i, "ct") for i, v in enumerate(stacks)]
        images = np.concatenate([v for v, _ in drawn])
        masks = np.concatenate([m for _, m in drawn])
        touched = masks.reshape(len(masks), -1).any(1)
        x = model_space(images[touched][:, None], ct_preset())
        f = features(x)
        maps = detectors["map"].anomaly_maps(f).numpy()
        row = {"defect": kind, "slices": int(touched.sum()), **localization_metrics(list(maps), list(masks[touched]))}
        for key, other in (
            ("unsmoothed", detectors["map"].anomaly_maps(f, 0.0)),
            ("per_pixel", smoothed(detectors["map"].maps(f), detectors["map"].smoothing)),
        ):
            row[f"pixel_auroc_{key}"] = localization_metrics(list(other.numpy()), list(masks[touched]))["pixel_auroc"]
        for name, d in detectors.items():
            row[f"auroc_{name}"] = ood_metrics(clean_scores[name], d.score(f).numpy())["auroc"]
        rows.append(row)
        first = images[touched][0][None]  # (1, H, W): the first slice the defect touches
        pictures = (overlay(first, maps[0]), overlay(first, masks[touched][0].astype(np.float32)))
        gallery.append(np.concatenate(pictures, axis=1))
        print(f"  {kind:<15} pixel AUROC {row['pixel_auroc']:.3f}  peak in mask {row['peak_in_mask']:.3f}", flush=True)
    header = (f"CT phantoms {data.train.shape[-1]}x{data.train.shape[-1]}: CDM trained {args.steps} steps "
              f"({seconds:.0f} s), map fitted on {len(data.val)} validation slices and smoothed by "
              f"{detectors['map'].smoothing} px, {len(stacks)} test volumes with one defect of each kind, "
              f"{len(data.test)} clean test slices; seed {args.seed}")  # fmt: skip
    text = f"{header}\n\n{table(rows)}\n"
    emit("localization", text)
    args.out.mkdir(parents=True, exist_ok=True)
    figure = save_png(np.concatenate(gallery, axis=0), args.figures / "localization-phantoms.png")
    files = [atomic_text(args.out / "phantoms.md", text), atomic_text(args.out / "phantoms.json", json.dumps(rows)),
             figure]  # fmt: skip
    if not args.no_tracking:
        metrics = {f"{k}.{r['defect']}": v for r in rows for k, v in r.items() if k not in ("defect", "slices")}
        log_job_run("localization", {"steps": args.steps, "seed": args.seed, "volumes": args.volumes},
                    metrics | {"train_seconds": seconds}, files)  # fmt: skip


def choose_smoothing(detector, features, seed: int, widths=(0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)) -> None:
    """Print the mean pixel AUROC over the defect kinds, on 4 development volumes of another seed, for each width
    and each standardisation of the errors: pooled over pixels (`MapDetector.anomaly_maps`) or per pixel (the
    detection map `MapDetector.maps`)."""
    rng = np.random.default_rng(seed + 10_000)
    volumes = [phantom_volume(rng, 32, 16, "ct") for _ in range(4)]
    found: dict[tuple[str, float], list[float]] = {(k, w): [] for k in ("pooled", "per-pixel") for w in widths}
    for kind in DEFECTS:
        drawn = [draw_defect(v, kind, 10_000 + 1000 * seed + i, "ct") for i, v in enumerate(volumes)]
        masks = np.concatenate([m for _, m in drawn])
        touched = masks.reshape(len(masks), -1).any(1)
        f = features(model_space(np.concatenate([v for v, _ in drawn])[touched][:, None], ct_preset()))
        unsmoothed = {"pooled": detector.anomaly_maps(f, 0.0), "per-pixel": detector.maps(f)}
        for (standardised, width), aurocs in found.items():
            maps = smoothed(unsmoothed[standardised], width)
            aurocs.append(localization_metrics(list(maps.numpy()), list(masks[touched]))["pixel_auroc"])
    for (standardised, width), aurocs in found.items():
        print(
            f"{standardised} z, smoothing {width} px: mean pixel AUROC {np.mean(aurocs):.3f} (min {np.min(aurocs):.3f})"
        )
    best = max(found, key=lambda k: np.mean(found[k]))
    print(f"best: {best[0]} z, {best[1]} px")


def table(rows: list[dict]) -> str:
    lines = ["| defect | slices | pixel AUROC | pixel AUROC unsmoothed | pixel AUROC per-pixel z | peak in mask | "
             "slice AUROC map | slice AUROC combined |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['defect']} | {r['slices']} | {r['pixel_auroc']:.3f} | {r['pixel_auroc_unsmoothed']:.3f} | "
                     f"{r['pixel_auroc_per_pixel']:.3f} | {r['peak_in_mask']:.3f} | {r['auroc_map']:.3f} | "
                     f"{r['auroc_combined']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
