"""Real scans: a checkpoint's CDM detectors against the DDPM baselines on the OOD sets of `make-phantoms --ood-sets`.

    python benchmarks/real_scans.py --checkpoint runs/ct/model.pt --data OOD_DIR --train TRAIN_DIR [--steps 1000]

--data is a folder written by `cdm-ood make-phantoms --ood-sets` (or any folder whose manifest.csv has its columns):
its clean volumes are the in-distribution test set, every other set of the manifest an OOD set (artifacts at the
reject strength, orientation errors, wrong-modality files). Every file is read by the project's readers and mapped
to the checkpoint's input space (`OODDetector.prepare`), so all models see the same images.

Detectors: every calibrated detector of the checkpoint (with its cost, `Detector.cost`), and the baselines of
`benchmarks/ood_baselines.py` (DDPM variational bound, ddpm-ood reconstruction MSE and SSIM), trained for --steps on
the clean scans of --train (a folder, or a manifest's clean volumes: the checkpoint's training data or more of it),
one volume in five held out to z-score the reconstruction errors.

Prints AUROC and FPR95 per set at slice level and at volume level (a volume's score is the mean of its slice scores,
`cdm_ood.ood.report.aggregate`), and per set the fraction of volumes each calibrated CDM detector does not pass at
its calibrated threshold (the gate's decision; on the clean volumes, its false-positive rate), as markdown tables
(the block --name of `tables.emit`), and writes them to --out as markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from ood_baselines import Benchmark, Scorer, atomic_text, by_detector, ddpm_scorers, table
from tables import emit

from cdm_ood.data.manifest import is_manifest, manifest_sets
from cdm_ood.data.readers import iter_slices
from cdm_ood.data.records import Slice
from cdm_ood.model.checkpoint import load_model
from cdm_ood.ood.api import OODDetector
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.ood.report import IN, aggregate, judge

LEVELS = ("slice", "volume")


def scorable(paths: list[Path]) -> list[Slice]:
    """The slices below `paths` that can be scored (no NaN/inf or constant pixels)."""
    return [s for s in iter_slices(paths) if not s.flags]


def volume_of(image: Slice) -> str:
    return image.source.volume_id or image.source.path


def held_out(images: list[Slice], every: int = 5) -> tuple[list[Slice], list[Slice]]:
    """(train, validation): every `every`-th volume is held out for validation; a single volume is both."""
    volumes = sorted({volume_of(s) for s in images})
    if len(volumes) == 1:
        return images, images
    val = set(volumes[::every])
    return [s for s in images if volume_of(s) not in val], [s for s in images if volume_of(s) in val]


def cdm_scorers(detectors: list[OODDetector]) -> tuple[dict[str, Scorer], dict[str, float]]:
    """Each calibrated detector of the checkpoint on model-space batches, with its cost in forward-pass
    equivalents per image."""
    return ({f"CDM {d.name}": d.score_prepared for d in detectors},
            {f"CDM {d.name}": d.detector.cost(d.model.spec.spatial_dims) for d in detectors})  # fmt: skip


def by_volume(scores: np.ndarray, images: list[Slice], how: str = "mean") -> np.ndarray:
    """One score per volume: the `how` aggregate of its slices' scores."""
    groups: dict[str, list[float]] = defaultdict(list)
    for score, image in zip(scores, images, strict=True):
        groups[volume_of(image)].append(float(score))
    combine = aggregate(how)
    return np.array([combine(np.array(v)) for v in groups.values()])


def measure(
    scorers: dict[str, Scorer],
    costs: dict[str, float],
    sets: dict[str, list[Slice]],
    images: dict[str, torch.Tensor],
    thresholds: dict[str, float],
) -> dict:
    """Per level, the metrics rows of `ood_baselines.table` (detector, metrics per OOD set, passes and ms per
    image); under "verdicts", per detector with a calibrated threshold the fraction of each set's volumes above it."""
    rows: dict[str, list[dict]] = {level: [] for level in (*LEVELS, "verdicts")}
    batch = torch.cat(list(images.values()))  # one batched pass over all sets
    ends = np.cumsum([len(x) for x in images.values()])
    for name, score in scorers.items():
        start = time.perf_counter()
        found_all = by_detector(name, score(batch))
        ms = (time.perf_counter() - start) / len(batch) * 1e3
        for detector, everything in found_all.items():
            scores = dict(zip(images, np.split(everything, ends[:-1]), strict=True))
            volumes = {k: by_volume(v, sets[k]) for k, v in scores.items()}
            for level, found in zip(LEVELS, (scores, volumes), strict=True):
                metrics = {k: ood_metrics(found["clean"], v) for k, v in found.items() if k != "clean"}
                rows[level].append({"detector": detector, "metrics": metrics, "passes": costs[detector],
                                    "ms_per_image": ms})  # fmt: skip
            if detector in thresholds:
                threshold = thresholds[detector]
                rates = {k: float(np.mean([judge(s, threshold)[0] != IN for s in v])) for k, v in volumes.items()}
                rows["verdicts"].append({"detector": detector, "rates": rates})
            print(f"  {detector:<28} scored in {ms:.1f} ms / image", flush=True)
    return rows


def verdict_table(rows: list[dict]) -> str:
    """The fraction of each set's volumes that each detector does not pass, clean first."""
    sets = list(rows[0]["rates"])
    lines = [f"| detector | {' | '.join(sets)} |", "|---" * (len(sets) + 1) + "|"]
    for r in rows:
        rates = " | ".join(f"{r['rates'][k]:.2f}" for k in sets)
        lines.append(f"| {r['detector']} | {rates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="A calibrated 2D checkpoint (model.pt).")
    parser.add_argument("--data", type=Path, required=True, help="A folder made by make-phantoms --ood-sets.")
    parser.add_argument("--train", type=Path, help="Clean scans (folder or manifest) to train the baselines on.")
    parser.add_argument("--no-baselines", action="store_true", help="Only the checkpoint's detectors.")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of the DDPM baseline.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--elbo-steps", type=int, default=50, help="Strided timesteps of the DDPM bound (full: 1000).")
    parser.add_argument("--recon-steps", type=int, default=50, help="DDIM levels of 1000 for reconstructions.")
    parser.add_argument("--out", type=Path, default=Path("runs/real-scans"), help="Tables (markdown, JSON).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the baseline's training.")
    parser.add_argument("--name", default="real-scans", help="Name of the printed table block (tables.emit).")
    args = parser.parse_args()
    if not args.no_baselines and args.train is None:
        parser.error("--train is needed to train the baselines (or pass --no-baselines)")
    torch.set_num_threads(2)
    model = load_model(args.checkpoint)
    names = sorted(model.calibration.detectors) if model.calibration else ["nll"]
    detectors = [OODDetector(model, name) for name in names]
    sets = {name: scorable(paths) for name, paths in manifest_sets(args.data / "manifest.csv").items()}
    images = {name: detectors[0].prepare(found) for name, found in sets.items()}
    scorers, costs = cdm_scorers(detectors)
    facts = ""
    if not args.no_baselines:
        train_paths = manifest_sets(args.train)["clean"] if is_manifest(args.train) else [args.train]
        train, val = (detectors[0].prepare(s) for s in held_out(scorable(train_paths)))
        data = Benchmark("real-scans", train, val, images["clean"], {}, model.spec.bit_depth, args.seed)
        print(f"training the DDPM baseline on {len(train)} slices, {args.steps} steps", flush=True)
        found, seconds, found_costs = ddpm_scorers(data, args.steps, args.batch, args.elbo_steps, args.recon_steps)
        scorers, costs = scorers | found, costs | found_costs
        facts = (
            f"; DDPM trained on {len(train)} slices for {args.steps} steps of batch {args.batch} ({seconds:.0f} s), "
            f"bound over {args.elbo_steps} timesteps, reconstructions over {args.recon_steps} DDIM levels"
        )
    print(f"scoring {sum(len(x) for x in images.values())} slices of {len(images)} sets", flush=True)
    rows = measure(scorers, costs, sets, images, {f"CDM {d.name}": d.threshold for d in detectors})
    counts = ", ".join(f"{k} {len(v)} slices / {len({volume_of(s) for s in v})} volumes" for k, v in sets.items())
    header = f"{args.checkpoint} on {args.data}: {counts}{facts}"
    sections = [f"{metric.upper()}, {level} level:\n\n{table(rows[level], metric)}"
                for level in LEVELS for metric in ("auroc", "fpr95")]  # fmt: skip
    verdicts = (
        f"Volumes not passed at the calibrated threshold (fpr {detectors[0].fpr}; a volume's score is the mean "
        f"of its slices'; `clean`: the false-positive rate):\n\n{verdict_table(rows['verdicts'])}"
    )
    text = "\n\n".join([header, *sections, verdicts]) + "\n"
    emit(args.name, text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_text(args.out / "real-scans.md", text)
    atomic_text(args.out / "real-scans.json", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
