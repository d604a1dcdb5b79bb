"""Minimal training loops on in-memory tensors, shared by the evidence scripts (Adam with linear warm-up and an
EMA copy), so each experiment states only its data, loss and budget."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss


def small_classifier(schedule: NoiseSchedule, channels=(16, 32), attention=(False, False)) -> CDMClassifier:
    return CDMClassifier(spatial_dims=2, in_channels=1, T=schedule.T, channels=channels, attention_levels=attention,
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8)  # fmt: skip


def train_ema(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Generator], torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    warmup_steps: int = 100,
    ema_decay: float = 0.995,
    seed: int = 0,
) -> tuple[torch.nn.Module, float]:
    """Minimise `loss_fn(model, generator)` with Adam; returns the EMA model and the wall time in seconds."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        loss = loss_fn(model, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - ema_decay)
    return ema, time.perf_counter() - start


def train_cdm(
    model: torch.nn.Module,
    draw: Callable[[int, torch.Generator], torch.Tensor],
    schedule: NoiseSchedule,
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    ce_weight: float = 1e-3,
    mse_weight: float = 1.0,
    seed: int = 0,
) -> tuple[torch.nn.Module, float]:
    """Algorithm 1 on batches `draw(batch, generator)`; returns the EMA (0.995) model and the wall time."""

    def loss(m: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        return cdm_loss(m, draw(batch, g), schedule, ce_weight=ce_weight, mse_weight=mse_weight, generator=g).loss

    return train_ema(model, loss, steps, lr=lr, seed=seed)
