"""Cost of an exact CDM likelihood (one forward pass, Theorem 3.2) against MONAI's DDPM likelihood
(`DiffusionInferer.get_likelihood`: the variational bound, one network call per timestep, T = 1000).

    python benchmarks/likelihood_cost.py [--checkpoint runs/<default run>/model.pt] [--images 8] [--threads 2]

The CDM classifier of each architecture (`unet`, and `encoder`: the UNet's down path and middle block) and the
DDPM network are MONAI `DiffusionModelUNet`s with the same channels, on 28x28 images, 2 CPU threads by default.
Prints the table block `likelihood-cost`: time per image and network calls of each, the ratios, and the CDM's
bits/dim on the bundled MNIST test split (a result with a trained checkpoint, whose architecture is timed with its
weights, the other untrained at the same width; the DDPM network is untrained, only its cost is measured, so its
bound is not a result). Tracked in MLflow (`cdm-ood-evidence`).
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
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.diffusion.classifier import ARCHS
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.model.checkpoint import load_model

CHANNELS, ATTENTION = (16, 32, 32), (False, False, True)
REPEATS = 20  # timings of each CDM likelihood, a few ms each; their median is reported
BOUND_REPEATS = 3  # timings of the DDPM bound, seconds each; their median is reported


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
    schedule = NoiseSchedule.uniform(1000)
    cdms = {arch: CDMClassifier(spatial_dims=2, in_channels=1, T=1000, channels=CHANNELS, attention_levels=ATTENTION,
                                num_res_blocks=1, norm_num_groups=8, num_head_channels=16, arch=arch).eval()
            for arch in ARCHS}  # fmt: skip
    if args.checkpoint:
        loaded = load_model(args.checkpoint)
        cdms[loaded.spec.model.arch], schedule = loaded.classifier, loaded.schedule
    trained = loaded.spec.model.arch if args.checkpoint else "unet"
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=CHANNELS,
                              attention_levels=ATTENTION, num_res_blocks=1, norm_num_groups=8,
                              num_head_channels=16).eval()  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=args.timesteps)
    inferer = DiffusionInferer(scheduler)
    calls = Counter()
    for name, net in (*cdms.items(), ("ddpm", unet)):
        net.register_forward_hook(lambda *_, name=name: calls.update([name]))
    with torch.no_grad():
        for cdm in cdms.values():
            log_likelihood(cdm, x, schedule)  # warm-up: the first calls of a fresh process are up to 100x slower
        calls.clear()
        per_image = {
            arch: seconds(lambda cdm=cdm: log_likelihood(cdm, x, schedule)) / len(x) for arch, cdm in cdms.items()
        }
        bound = seconds(lambda: inferer.get_likelihood((x + 1) / 2, unet, scheduler, verbose=False), BOUND_REPEATS)
        per_image["ddpm"] = bound / len(x)
        per_batch = {arch: calls[arch] // REPEATS for arch in ARCHS} | {"ddpm": calls["ddpm"] // BOUND_REPEATS}
        ll = log_likelihood(cdms[trained], images(args.bpd_images), schedule).double()
        bpd = bits_per_dim(ll, 28 * 28).mean().item()
    rows = [[f"CDM `{arch}` `log_likelihood` (Theorem 3.2)", f"{per_image[arch] * 1e3:.2f} ms", per_batch[arch]]
            for arch in ARCHS]  # fmt: skip
    rows += [[f"MONAI `DiffusionInferer.get_likelihood` (DDPM variational bound, T = {args.timesteps})",
              f"{per_image['ddpm'] * 1e3:.0f} ms", per_batch["ddpm"]]]  # fmt: skip
    rows += [[f"ratio `{arch}`", f"**{per_image['ddpm'] / per_image[arch]:.0f}x**", ""] for arch in ARCHS]
    weights = f"`{args.checkpoint}` ({loaded.step} training steps)" if args.checkpoint else "untrained"
    emit("likelihood-cost", markdown(["method", "time per image", "network calls"], rows) + (
        f"\n\n{len(x)} MNIST images 28x28, UNet {CHANNELS}, {args.threads} threads. The CDM `{trained}` ({weights}): "
        f"{bpd:.2f} bits/dim on {args.bpd_images} bundled MNIST test images."
    ))  # fmt: skip
    if not args.no_tracking:
        metrics = {f"{name}_ms_per_image": t * 1e3 for name, t in per_image.items()} | {"cdm_bpd": bpd}
        log_job_run("evidence", {"benchmark": "likelihood_cost", **vars(args)}, metrics, [])


if __name__ == "__main__":
    main()
