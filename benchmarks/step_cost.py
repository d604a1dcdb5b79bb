"""Cost of one CDM training step (Algorithm 1, double backward) relative to one DDPM training step.

Both use MONAI's DiffusionModelUNet with the same channels, batch and optimiser; steps are interleaved in
one process so that machine noise hits both alike. Prints the table block `step-cost`: the median step of each,
the median of the per-step ratios, the same ratio for copies of both networks with every GroupNorm replaced by
identity or every SiLU by ReLU (measurement only: where the cost goes), and the phase split of one CDM step.

    python benchmarks/step_cost.py [--batch 64] [--size 28] [--threads 2] [--steps 10]
                                   [--variants as-is no-groupnorm relu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from tables import emit, markdown
from torch import nn

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss, diffuse
from cdm_ood.denoiser import call_classifier, logits_and_noise
from cdm_ood.schedules import timesteps
from cdm_ood.training import fit

CHANNELS = (32, 64, 64)
ATTENTION = (False, False, True)
# name: (module type replaced in both networks, its replacement, the table's label); None keeps the networks.
VARIANTS = {
    "as-is": None,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    unet = DiffusionModelUNet(
        2, 1, 1, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1, num_head_channels=32
    )
    cdm = CDMClassifier(2, 1, schedule.T, channels=CHANNELS, attention_levels=ATTENTION, num_res_blocks=1)
    models = {}
    for name in args.variants:
        pair = (unet, cdm) if VARIANTS[name] is None else (swapped(m, *VARIANTS[name][:2]) for m in (unet, cdm))
        models[name] = [(m, torch.optim.Adam(m.parameters(), 2e-4)) for m in pair]
    x0 = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    times = {name: {"ddpm": [], "cdm": [], "forward": [], "input gradient": []} for name in models}
    for i in range(args.warmup + args.steps):
        print(f"step {i + 1 - args.warmup} of {args.steps}" if i >= args.warmup else "warm-up", file=sys.stderr)
        for name, ((u, u_opt), (c, c_opt)) in models.items():
            step = {"ddpm": timed(ddpm_step, u, u_opt, x0, schedule), "cdm": timed(cdm_step, c, c_opt, x0, schedule)}
            if name == "as-is":
                step |= {"forward": timed(cdm_forward, c, x0, schedule),
                         "input gradient": timed(cdm_input_gradient, c, x0, schedule)}  # fmt: skip
            if i >= args.warmup:
                for key, value in step.items():
                    times[name][key].append(value)
    tables = []
    if "as-is" in times:
        t = times["as-is"]
        tables.append(markdown(["model", "median step"], [
            ["DDPM (MONAI UNet, eps-prediction MSE)", seconds(statistics.median(t["ddpm"]))],
            ["CDM (`cdm_loss`, same UNet + head)", seconds(statistics.median(t["cdm"]))],
            ["**ratio**", ratio_cell(t["cdm"], t["ddpm"], bold=True)],
        ]))  # fmt: skip
    swaps = [[VARIANTS[name][2], seconds(statistics.median(t["ddpm"])), seconds(statistics.median(t["cdm"])),
              ratio_cell(t["cdm"], t["ddpm"])] for name, t in times.items() if name != "as-is"]  # fmt: skip
    if swaps:
        tables.append(markdown(["both networks, for measurement only", "DDPM step", "CDM step", "ratio"], swaps))
    if "as-is" in times:
        forward, gradient, step = (statistics.median(times["as-is"][k]) for k in ("forward", "input gradient", "cdm"))
        tables.append(markdown(["phase of one CDM step (difference of medians)", "median"], [
            ["forward", seconds(forward)],
            ["input gradient (`create_graph=True`)", seconds(gradient - forward)],
            ["double backward, loss and Adam step", seconds(step - gradient)],
        ]))  # fmt: skip
    setting = (
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"channels {CHANNELS}, {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    text = "\n\n".join([*tables, setting])
    emit("step-cost", text)


if __name__ == "__main__":
    main()
