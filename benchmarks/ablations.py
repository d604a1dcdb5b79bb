"""Loss ablation (paper Table 1) and schedules (paper Table 3) at CPU scale, through `cdm-ood train` itself.

    python benchmarks/ablations.py [--steps 600] [--out runs/ablations]
    python benchmarks/ablations.py --config cifar10 --steps 200000 --set data.root=...     # the paper's setting

Variants of the bundled `mnist-cpu` config with the same budget: both losses (ce_weight 1e-3, the default),
CE only, MSE only, and both with the linear schedule instead of the uniform one. For each: bits/dim of the
EMA model on 500 bundled MNIST test images and a 16-sample DDIM grid (50 steps) saved as PNG; each run is
tracked in MLflow (experiment `cdm-ood-ablations`, ./mlflow.db unless $MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tables import emit, markdown

from cdm_ood import bits_per_dim, log_likelihood, sample
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.integrations.tracking import MlflowCallback, RunFolderCallback
from cdm_ood.jobs.config import bundled_config, load_config
from cdm_ood.jobs.training import train
from cdm_ood.model.checkpoint import load_model
from cdm_ood.utils.figures import image_grid, save_png

VARIANTS = {  # name: (label, overrides of the config)
    "both": ("both losses (default: {schedule} schedule, ce_weight {ce:g})", []),
    "ce-only": ("CE only", ["loss.ce_weight=1.0", "loss.mse_weight=0.0"]),
    "mse-only": ("MSE only", ["loss.ce_weight=0.0"]),
    "both-linear": ("both losses, linear schedule", ["schedule.kind=linear"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist-cpu")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--figures", type=Path, default=Path("docs/img"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the runs to MLflow.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of the variants.")
    args = parser.parse_args()
    x = np.stack([s["image"] for s in bundled_mnist("test")[: args.test_images]]).astype(np.float32)
    x = torch.from_numpy(x / 127.5 - 1.0)
    steps = [f"train.steps={args.steps}", f"train.val_every={args.steps}", f"train.checkpoint_every={args.steps}"]
    base = load_config(bundled_config(args.config), [*args.overrides, *steps])
    rows = []
    for name in args.variants.split(","):
        label, overrides = VARIANTS[name]
        config = load_config(bundled_config(args.config), [*args.overrides, *steps, *overrides])
        start = time.perf_counter()
        callbacks = [RunFolderCallback(args.out / name)]
        if not args.no_tracking:
            callbacks.append(MlflowCallback(None, "cdm-ood-ablations", name))
        model = load_model(train(config, args.out / name, callbacks=callbacks))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            ll = torch.cat([log_likelihood(model.classifier, c, model.schedule).double() for c in x.split(100)])
        bpd = bits_per_dim(ll, x[0].numel()).mean().item()
        grid = sample(model.classifier, model.schedule, (16, 1, 28, 28), "ddim", args.sample_steps,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
        path = save_png(image_grid(grid), args.figures / f"ablation-{name}.png")
        print(f"{name}: {bpd:.3f} bits/dim, {seconds:.0f} s, {path}", file=sys.stderr, flush=True)
        label = label.format(schedule=base.schedule.kind, ce=base.loss.ce_weight)
        image = f"![{name}]({args.figures.name}/{Path(path).name})"  # docs/*.md link the figures folder beside them
        rows.append((label, f"`{' '.join(overrides)}`" if overrides else "-", f"{bpd:.3f}", f"{seconds:.0f} s", image))
    budget = (
        f"`{args.config}` config, {args.steps} training steps of batch {base.train.batch_size} each; bits/dim of "
        f"the EMA model on {len(x)} bundled MNIST test images; 16 DDIM samples of {args.sample_steps} steps; "
        f"{torch.get_num_threads()} CPU threads."
    )
    header = ("variant", "overrides", "test bits/dim", "train time", "samples")
    emit("ablations", budget + "\n\n" + markdown(header, rows))


if __name__ == "__main__":
    main()
