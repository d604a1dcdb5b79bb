"""Cost of an exact CDM likelihood (one forward pass, Theorem 3.2) against MONAI's DDPM likelihood
(`DiffusionInferer.get_likelihood`: the variational bound, one network call per timestep, T = 1000).

    python benchmarks/likelihood_cost.py [--checkpoint runs/<default run>/model.pt] [--images 8] [--threads 2]

Both networks are MONAI `DiffusionModelUNet`s with the same channels, on 28x28 images, 2 CPU threads by default.
Prints the table block `likelihood-cost`: time per image and network calls of each, their ratio, and the CDM's
bits/dim on the bundled MNIST test split (a result with a trained checkpoint; the DDPM network is untrained, only
its cost is measured, so its bound is not a result). Tracked in MLflow (`cdm-ood-evidence`).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from tables import emit, markdown

from cdm_ood import CDMClassifier, NoiseSchedule, bits_per_dim, log_likelihood
from cdm_ood.checkpoint import load_model
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.tracking import log_job_run

CHANNELS, ATTENTION = (16, 32, 32), (False, False, True)
REPEATS = 3  # timings of the CDM likelihood (its median is reported); the DDPM bound is timed once


def images(n: int) -> torch.Tensor:
    x = np.stack([s["image"] for s in bundled_mnist("test")[:n]]).astype(np.float32)
    return torch.from_numpy(x / 127.5 - 1.0)


def seconds(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=str, help="A trained 28x28 CDM (the default `cdm-ood train` run).")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--bpd-images", type=int, default=500, help="Test images for the CDM's bits/dim.")
    parser.add_argument("--timesteps", type=int, default=1000, help="DDPM steps of the bound (the paper: 1000).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the run to MLflow.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = images(args.images)
    if args.checkpoint:
        loaded = load_model(args.checkpoint)
        cdm, schedule = loaded.classifier, loaded.schedule
    else:
        schedule = NoiseSchedule.uniform(1000)
        cdm = CDMClassifier(spatial_dims=2, in_channels=1, T=1000, channels=CHANNELS, attention_levels=ATTENTION,
                            num_res_blocks=1, norm_num_groups=8, num_head_channels=16).eval()  # fmt: skip
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=CHANNELS,
                              attention_levels=ATTENTION, num_res_blocks=1, norm_num_groups=8,
                              num_head_channels=16).eval()  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=args.timesteps)
    inferer = DiffusionInferer(scheduler)
    with torch.no_grad():
        log_likelihood(cdm, x, schedule)  # warm-up: the first calls of a fresh process are up to 100x slower
    calls = Counter()
    for name, net in (("cdm", cdm), ("ddpm", unet)):
        net.register_forward_hook(lambda *_, name=name: calls.update([name]))
    with torch.no_grad():
        t_cdm = seconds(lambda: log_likelihood(cdm, x, schedule))
        t_ddpm = seconds(lambda: inferer.get_likelihood((x + 1) / 2, unet, scheduler, verbose=False), repeats=1)
        per_batch = {"cdm": calls["cdm"] // REPEATS, "ddpm": calls["ddpm"]}  # network calls of one likelihood of `x`
        bpd = bits_per_dim(log_likelihood(cdm, images(args.bpd_images), schedule).double(), 28 * 28).mean().item()
    per_cdm, per_ddpm = t_cdm / len(x), t_ddpm / len(x)
    rows = [
        ["CDM `log_likelihood` (Theorem 3.2)", f"{per_cdm * 1e3:.2f} ms", per_batch["cdm"]],
        [f"MONAI `DiffusionInferer.get_likelihood` (DDPM variational bound, T = {args.timesteps})",
         f"{per_ddpm * 1e3:.0f} ms", per_batch["ddpm"]],
        ["ratio", f"**{per_ddpm / per_cdm:.0f}x**", ""],
    ]  # fmt: skip
    trained = f"`{args.checkpoint}` ({loaded.step} training steps)" if args.checkpoint else "untrained"
    emit("likelihood-cost", markdown(["method", "time per image", "network calls"], rows) + (
        f"\n\n{len(x)} MNIST images 28x28, UNet {CHANNELS}, {args.threads} threads. The CDM ({trained}): "
        f"{bpd:.2f} bits/dim on {args.bpd_images} bundled MNIST test images."
    ))  # fmt: skip
    if not args.no_tracking:
        metrics = {"cdm_ms_per_image": per_cdm * 1e3, "ddpm_ms_per_image": per_ddpm * 1e3, "cdm_bpd": bpd}
        log_job_run("evidence", {"benchmark": "likelihood_cost", **vars(args)}, metrics, [])


if __name__ == "__main__":
    main()
