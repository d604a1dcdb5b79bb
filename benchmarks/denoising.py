"""MMSE denoising of the CDM's gradient denoiser (Theorem 3.1) against a DDPM epsilon-network (paper Fig. 5).

    python benchmarks/denoising.py --cdm runs/<default run>/model.pt

The DDPM network is MONAI's `DiffusionModelUNet` with the CDM's backbone settings, trained here with the same
data (bundled MNIST), batch, optimiser, EMA, noise schedule and number of steps as the CDM checkpoint. Both
denoise 500 test images at several noise levels; the table gives the per-pixel MSE of x0_hat (data in
[-1, 1]). The paper's claim: the CDM is better at high noise. Tracked in MLflow (`cdm-ood-evidence`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from quick_train import train_ema
from tables import emit, markdown

from cdm_ood import diffuse, predict_noise, predict_x0
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.diffusion.sampling import matching_level
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.model.checkpoint import load_model

RATIOS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # sigma_t / alpha_t


def mnist(split: str, n: int | None = None) -> torch.Tensor:
    x = np.stack([s["image"] for s in bundled_mnist(split)[:n]]).astype(np.float32)
    return torch.from_numpy(x / 127.5 - 1.0)


def train_ddpm(cfg: dict, schedule, steps: int, data: torch.Tensor) -> tuple[torch.nn.Module, float]:
    m, o, t = cfg["model"], cfg["optim"], cfg["train"]
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(m["channels"]),
        attention_levels=tuple(m["attention_levels"]), num_res_blocks=m["num_res_blocks"],
        norm_num_groups=m["norm_num_groups"], num_head_channels=m["num_head_channels"],
    )  # fmt: skip

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        x0 = data[torch.randint(len(data), (t["batch_size"],), generator=g)]
        ts = torch.randint(1, schedule.T + 1, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return F.mse_loss(net(diffuse(x0, ts, noise, schedule), ts), noise)

    return train_ema(unet, loss, steps, lr=o["lr"], warmup_steps=o["warmup_steps"], ema_decay=o["ema_decay"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cdm", required=True, help="A CDM checkpoint trained on the bundled MNIST (mnist-cpu).")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--steps", type=int, help="DDPM training steps [default: the CDM's].")
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the run to MLflow.")
    args = parser.parse_args()
    cdm = load_model(args.cdm)
    schedule = cdm.schedule
    steps = args.steps or cdm.step
    ddpm, seconds = train_ddpm(cdm.config, schedule, steps, mnist("train"))
    x0 = mnist("test", args.images)
    g = torch.Generator().manual_seed(1)
    metrics, rows = {"ddpm_train_seconds": seconds}, []
    for ratio in RATIOS:
        t = matching_level(schedule, ratio)
        noise = torch.randn(x0.shape, generator=g)
        xt = diffuse(x0, torch.full((len(x0),), t), noise, schedule)
        errors = []
        for eps in (
            torch.cat([predict_noise(cdm.classifier, c, t, schedule) for c in xt.split(100)]),
            torch.cat([ddpm(c, torch.full((len(c),), t)).detach() for c in xt.split(100)]),
        ):
            errors.append(F.mse_loss(predict_x0(eps, xt, t, schedule).clamp(-1, 1), x0).item())
        print(f"sigma/alpha {ratio}: t {t}, CDM {errors[0]:.4f}, DDPM {errors[1]:.4f}", file=sys.stderr, flush=True)
        rows.append(
            (f"{ratio:.2f}", t, f"{errors[0]:.4f}", f"{errors[1]:.4f}", "CDM" if errors[0] < errors[1] else "DDPM")
        )
        metrics |= {f"cdm_mse.{ratio}": errors[0], f"ddpm_mse.{ratio}": errors[1]}
    budget = (
        f"MNIST 28x28, {steps} training steps each (DDPM trained here in {seconds:.0f} s), {len(x0)} test images, "
        f"{schedule.kind} schedule T = {schedule.T}, {torch.get_num_threads()} CPU threads."
    )
    header = ("sigma_t / alpha_t", "t", "CDM MSE", "DDPM MSE", "better")
    emit("denoising", budget + "\n\n" + markdown(header, rows))
    if not args.no_tracking:
        log_job_run("evidence", {"benchmark": "denoising", **vars(args), "steps": steps}, metrics, [])


if __name__ == "__main__":
    main()
