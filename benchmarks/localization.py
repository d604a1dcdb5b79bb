"""Where is a scan out of distribution: anomaly maps of the CDM on CT phantoms with local defects of known mask.

    python benchmarks/localization.py [--steps 1000] [--volumes 24,4,4] [--seed 0]

The CDM of `benchmarks/ood_baselines.py` (same data, architecture and budget) is trained on clean 32x32 phantom
slices; its `map` detector is fitted on the validation slices. Each test volume then gets one defect of each kind
of `cdm_ood.data.defects` (metal with streaks, lesion, foreign object, local ghost) with its mask. Per kind, over
the slices the defect touches: pixel-level AUROC of the map against the mask and the fraction of maps whose peak
lies inside the mask (`cdm_ood.ood.metrics.localization_metrics`); and the slice-level AUROC of the `map` and
`combined` detectors against the clean test slices. Prints a markdown table, saves a gallery of overlays (image,
map, mask per row) and logs everything to MLflow (experiment `cdm-ood-localization`).
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
from cdm_ood.data.presets import ct_preset
from cdm_ood.figures import save_png
from cdm_ood.ood.detectors import DETECTORS, required_features
from cdm_ood.ood.features import batched_features
from cdm_ood.ood.map_outputs import overlay
from cdm_ood.ood.metrics import localization_metrics, ood_metrics
from cdm_ood.tracking import log_job_run

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
        maps = detectors["map"].maps(f).numpy()
        row = {"defect": kind, "slices": int(touched.sum()), **localization_metrics(list(maps), list(masks[touched]))}
        for name, d in detectors.items():
            row[f"auroc_{name}"] = ood_metrics(clean_scores[name], d.score(f).numpy())["auroc"]
        rows.append(row)
        first = images[touched][0][None]  # (1, H, W): the first slice the defect touches
        pictures = (overlay(first, maps[0]), overlay(first, masks[touched][0].astype(np.float32)))
        gallery.append(np.concatenate(pictures, axis=1))
        print(f"  {kind:<15} pixel AUROC {row['pixel_auroc']:.3f}  peak in mask {row['peak_in_mask']:.3f}", flush=True)
    header = (f"CT phantoms {data.train.shape[-1]}x{data.train.shape[-1]}: CDM trained {args.steps} steps "
              f"({seconds:.0f} s), map fitted on {len(data.val)} validation slices, {len(stacks)} test volumes with "
              f"one defect of each kind, {len(data.test)} clean test slices; seed {args.seed}")  # fmt: skip
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


def table(rows: list[dict]) -> str:
    lines = ["| defect | slices | pixel AUROC | peak in mask | slice AUROC map | slice AUROC combined |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['defect']} | {r['slices']} | {r['pixel_auroc']:.3f} | {r['peak_in_mask']:.3f} | "
                     f"{r['auroc_map']:.3f} | {r['auroc_combined']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
