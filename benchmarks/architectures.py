"""The encoder-only classifier against the UNet classifier at the same budget, to choose `model.arch` by evidence.

    python benchmarks/architectures.py [--dataset mnist,phantoms] [--steps 1000] [--images 200]

For each in-distribution set of benchmarks/ood_baselines.py (the bundled MNIST digits, class-conditional; 32x32
slices of generated CT phantoms) and each architecture (`unet`: MONAI's DiffusionModelUNet + head; `encoder`: its
down path and middle block + head), one CDM with the network of the default `mnist-cpu` / `phantoms-ct` configs,
trained with the same data, steps, batch and seed. Prints the table block `architectures`: parameters, training
time, bits/dim on the in-distribution test images, AUROC of the `nll` and `combined` detectors on every OOD set of
that benchmark (fitted on validation images), scoring time, and a 16-sample DDIM grid (PNG). Tracked in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from ood_baselines import Benchmark, add_benchmark_arguments, benchmarks, cdm_scorers, evaluate, train_benchmark_cdm
from tables import emit, markdown

from cdm_ood import bits_per_dim, log_likelihood, sample
from cdm_ood.diffusion.classifier import ARCHS
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.utils.figures import image_grid, save_png

DETECTORS = ("nll", "combined")


def compare(data: Benchmark, arch: str, args: argparse.Namespace) -> tuple[list[str], dict[str, float], Path]:
    """One architecture on one benchmark: its table row, its MLflow metrics and its sample grid."""
    print(f"{data.name}, {arch}: training {args.steps} steps", file=sys.stderr, flush=True)
    model, schedule, num_classes, seconds = train_benchmark_cdm(data, args.steps, args.batch, arch)
    with torch.no_grad():
        ll = torch.cat([log_likelihood(model, x, schedule).double() for x in data.test.split(100)])
    bpd = bits_per_dim(ll, data.test[0].numel(), data.bit_depth).mean().item()
    scorers, costs = cdm_scorers(data, model, schedule, num_classes, DETECTORS)
    rows = {r["detector"].removeprefix("CDM "): r for r in evaluate(data, scorers, costs)}
    aurocs = {name: [m["auroc"] for m in r["metrics"].values()] for name, r in rows.items()}
    grid = sample(model, schedule, (16, *data.test.shape[1:]), "ddim", args.sample_steps,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    path = save_png(image_grid(grid), args.figures / f"architectures-{data.name}-{arch}.png")
    parameters = sum(p.numel() for p in model.parameters())
    row = [f"`{arch}`", f"{parameters / 1e3:.0f}k", f"{seconds:.0f} s", f"{bpd:.3f}", f"{np.mean(aurocs['nll']):.3f}",
           *(f"{a:.3f}" for a in aurocs["combined"]), f"**{np.mean(aurocs['combined']):.3f}**",
           f"{rows['combined']['ms_per_image']:.1f}", f"![{arch}]({args.figures.name}/{path.name})"]  # fmt: skip
    metrics = {"train_seconds": seconds, "test_bpd": bpd, "parameters": parameters,
               **{f"mean_auroc.{name}": float(np.mean(a)) for name, a in aurocs.items()}}  # fmt: skip
    return row, metrics, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_benchmark_arguments(parser)
    parser.add_argument("--archs", default=",".join(ARCHS), help="Comma-separated classifier architectures.")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grids.")
    args = parser.parse_args()
    tables = []
    for data in benchmarks(args):
        name = data.name
        results = [compare(data, arch, args) for arch in args.archs.split(",")]
        header = ["classifier", "parameters", "train time", "test bits/dim", "AUROC `nll` (mean)",
                  *(f"`combined` {s}" for s in data.ood), "`combined` mean", "ms / image", "samples"]  # fmt: skip
        tables.append(
            f"{name}: {len(data.train)} training images, {args.steps} steps of batch {args.batch}; "
            f"{len(data.test)} ID test images; detectors fitted on {len(data.val)} validation images\n\n"
            + markdown(header, [row for row, _, _ in results])
        )
        if not args.no_tracking:
            for arch, (_, metrics, path) in zip(args.archs.split(","), results, strict=True):
                params = {"benchmark": "architectures", "dataset": name, "arch": arch, "steps": args.steps,
                          "batch": args.batch, "seed": args.seed}  # fmt: skip
                log_job_run("evidence", params, metrics, [path])
    setting = f"{torch.get_num_threads()} CPU threads; DDIM grids of {args.sample_steps} steps, seed 0."
    emit("architectures", "\n\n".join([*tables, setting]))


if __name__ == "__main__":
    main()
