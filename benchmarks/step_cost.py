"""Cost of one CDM training step (Algorithm 1, double backward) relative to one DDPM training step.

Both use MONAI's DiffusionModelUNet with the same channels, batch and optimiser; steps are interleaved in
one process so that machine noise hits both alike. Prints the table block `step-cost`: the median step of each
classifier architecture (`unet`, and `encoder`: the UNet's down path and middle block only) against the DDPM
UNet's, the medians of the per-step ratios, the same ratio for copies of the UNet pair with every GroupNorm
replaced by identity or every SiLU by ReLU (measurement only: where the cost goes), the phase split of one
CDM step of each architecture, and the network work of one sampler step (the gradient denoiser of Theorem 3.1:
one forward and one backward pass) against one DDPM UNet forward pass.

    python benchmarks/step_cost.py [--batch 64] [--size 28] [--threads 2] [--steps 10]
                                   [--variants unet encoder no-groupnorm relu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from tables import emit, markdown
from torch import nn

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss, diffuse, predict_noise
from cdm_ood.diffusion.denoiser import call_classifier, logits_and_noise
from cdm_ood.diffusion.schedules import timesteps
from cdm_ood.jobs.training import fit

CHANNELS = (32, 64, 64)
ATTENTION = (False, False, True)
ARCH_LABELS = {"unet": "same UNet + head", "encoder": "encoder-only: the UNet's down path and middle block + head"}
# name: (module type replaced in both UNet-pair networks, its replacement, the table's label).
SWAPS = {
    "no-groupnorm": (nn.GroupNorm, nn.Identity, "every GroupNorm replaced by identity"),
    "relu": (nn.SiLU, nn.ReLU, "every SiLU replaced by ReLU"),
}


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


def cdm_forward(model: CDMClassifier, x0: torch.Tensor, schedule: NoiseSchedule):
    """The first phase of a CDM step: the forward pass, keeping its graph."""
    call_classifier(model, x0.detach().requires_grad_(True), schedule, None)


def cdm_input_gradient(model: CDMClassifier, x0: torch.Tensor, schedule: NoiseSchedule):
    """The first two phases of a CDM step: the forward pass and the input gradient with `create_graph=True`."""
    t = timesteps(torch.randint(0, schedule.num_classes, (x0.shape[0],)), x0)
    logits_and_noise(model, x0, t, schedule, create_graph=True)


def ddpm_forward(unet: DiffusionModelUNet, x: torch.Tensor, schedule: NoiseSchedule):
    """One DDPM sampler step's network work: eps_theta(x_t, t), one forward pass without a graph."""
    with torch.no_grad():
        unet(x, torch.full((x.shape[0],), schedule.T // 2))


def denoiser(model: CDMClassifier, x: torch.Tensor, schedule: NoiseSchedule):
    """One CDM sampler step's network work: eps_hat(x_t, t) of Theorem 3.1, one forward and one backward pass."""
    predict_noise(model, x, schedule.T // 2, schedule)


def swapped(model: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> nn.Module:
    """A copy of `model` with every `old` module replaced by `new()`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, old):
                setattr(parent, name, new())
    return model


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def seconds(value: float) -> str:
    return f"{value:.3g} s"


def ratio_cell(cdm: list[float], ddpm: list[float], bold: bool = False) -> str:
    """The median of the per-step ratios CDM/DDPM, with their min and max."""
    ratios = [c / d for c, d in zip(cdm, ddpm, strict=True)]
    median = f"{statistics.median(ratios):.2f}x"
    return (f"**{median}**" if bold else median) + (
        f" (min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} interleaved steps)"
    )


def versus(times: dict, archs: list[str], ddpm: tuple[str, str], cdm: tuple[str, Callable[[str], str]]) -> list:
    """Table rows: the DDPM network's median time (key, label), then each architecture's median and the median of
    its per-step ratios to the DDPM times interleaved with it."""
    (d, d_label), (c, c_label) = ddpm, cdm
    rows = [[d_label, seconds(statistics.median([v for name in archs for v in times[name][d]])), ""]]
    return rows + [[c_label(name), seconds(statistics.median(times[name][c])),
                    ratio_cell(times[name][c], times[name][d], bold=True)] for name in archs]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=[*ARCH_LABELS, *SWAPS], default=[*ARCH_LABELS, *SWAPS])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    unet = DiffusionModelUNet(
        2, 1, 1, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1, num_head_channels=32
    )
    cdms = {arch: CDMClassifier(2, 1, schedule.T, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1,
                                arch=arch) for arch in ARCH_LABELS}  # fmt: skip
    models = {}
    for name in args.variants:
        pair = (
            (unet, cdms[name]) if name in ARCH_LABELS else (swapped(m, *SWAPS[name][:2]) for m in (unet, cdms["unet"]))
        )
        models[name] = [(m, torch.optim.Adam(m.parameters(), 2e-4)) for m in pair]
    x0 = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    times = {name: defaultdict(list) for name in models}
    for i in range(args.warmup + args.steps):
        print(f"step {i + 1 - args.warmup} of {args.steps}" if i >= args.warmup else "warm-up", file=sys.stderr)
        for name, ((u, u_opt), (c, c_opt)) in models.items():
            step = {"ddpm": timed(ddpm_step, u, u_opt, x0, schedule), "cdm": timed(cdm_step, c, c_opt, x0, schedule)}
            if name in ARCH_LABELS:
                step |= {"forward": timed(cdm_forward, c, x0, schedule),
                         "input gradient": timed(cdm_input_gradient, c, x0, schedule),
                         "ddpm forward": timed(ddpm_forward, u, x0, schedule),
                         "denoiser": timed(denoiser, c, x0, schedule)}  # fmt: skip
            if i >= args.warmup:
                for key, value in step.items():
                    times[name][key].append(value)
    archs = [name for name in times if name in ARCH_LABELS]
    tables = []
    if archs:
        rows = versus(times, archs, ("ddpm", "DDPM (MONAI UNet, eps-prediction MSE)"),
                      ("cdm", lambda name: f"CDM `{name}` (`cdm_loss`, {ARCH_LABELS[name]})"))  # fmt: skip
        tables.append(markdown(["model", "median step", "ratio to the DDPM step"], rows))
    swaps = [[SWAPS[name][2], seconds(statistics.median(t["ddpm"])), seconds(statistics.median(t["cdm"])),
              ratio_cell(t["cdm"], t["ddpm"])] for name, t in times.items() if name in SWAPS]  # fmt: skip
    if swaps:
        tables.append(markdown(["the UNet pair, for measurement only", "DDPM step", "CDM step", "ratio"], swaps))
    if archs:
        phases = {
            name: [statistics.median(times[name][k]) for k in ("forward", "input gradient", "cdm")] for name in archs
        }
        tables.append(markdown(["phase of one CDM step (difference of medians)", *(f"`{n}`" for n in archs)], [
            ["forward", *(seconds(f) for f, _, _ in phases.values())],
            ["input gradient (`create_graph=True`)", *(seconds(g - f) for f, g, _ in phases.values())],
            ["double backward, loss and Adam step", *(seconds(s - g) for _, g, s in phases.values())],
        ]))  # fmt: skip
        rows = versus(times, archs, ("ddpm forward", "DDPM UNet forward (no graph)"),
                      ("denoiser", lambda name: f"CDM `{name}` gradient denoiser (forward + backward)"))  # fmt: skip
        tables.append(markdown(["one sampler step's network work", "median", "ratio to the DDPM forward"], rows))
    setting = (
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"channels {CHANNELS}, {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    text = "\n\n".join([*tables, setting])
    emit("step-cost", text)


if __name__ == "__main__":
    main()
