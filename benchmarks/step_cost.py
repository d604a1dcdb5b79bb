"""Cost of one CDM training step (Algorithm 1, double backward) relative to one DDPM training step.

Both use MONAI's DiffusionModelUNet with the same channels, batch and optimiser; steps are interleaved in
one process so that machine noise hits both alike. Prints per-step times and the median ratio.

    python benchmarks/step_cost.py [--batch 64] [--size 28] [--threads 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss, diffuse
from cdm_ood.training import fit

CHANNELS = (32, 64, 64)
ATTENTION = (False, False, True)


def ddpm_step(unet: DiffusionModelUNet, opt: torch.optim.Optimizer, x0: torch.Tensor, schedule: NoiseSchedule):
    """One step of the project's training loop (`fit`) on the DDPM eps-prediction loss."""

    def loss(batch: torch.Tensor) -> SimpleNamespace:
        t = torch.randint(1, schedule.T + 1, (batch.shape[0],))
        noise = torch.randn_like(batch)
        return SimpleNamespace(loss=F.mse_loss(unet(diffuse(batch, t, noise, schedule), t), noise))

    fit(unet, [x0], loss, opt)


def cdm_step(model: CDMClassifier, opt: torch.optim.Optimizer, x0: torch.Tensor, schedule: NoiseSchedule):
    """One step of the project's training loop (`fit`) on Algorithm 1."""
    fit(model, [x0], lambda batch: cdm_loss(model, batch, schedule), opt)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    unet = DiffusionModelUNet(
        2, 1, 1, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1, num_head_channels=32
    )
    cdm = CDMClassifier(2, 1, schedule.T, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1)
    opts = (torch.optim.Adam(unet.parameters(), 2e-4), torch.optim.Adam(cdm.parameters(), 2e-4))
    x0 = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    ddpm_times, cdm_times = [], []
    for i in range(args.warmup + args.steps):
        d, c = timed(ddpm_step, unet, opts[0], x0, schedule), timed(cdm_step, cdm, opts[1], x0, schedule)
        if i >= args.warmup:
            ddpm_times.append(d)
            cdm_times.append(c)
    ratios = [c / d for c, d in zip(cdm_times, ddpm_times, strict=True)]
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"channels {CHANNELS}"
    )
    print(f"DDPM step: median {statistics.median(ddpm_times):.3f} s")
    print(f"CDM step:  median {statistics.median(cdm_times):.3f} s")
    print(f"ratio CDM/DDPM: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
