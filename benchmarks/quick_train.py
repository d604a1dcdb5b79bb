"""Minimal training loops on in-memory tensors, shared by the evidence scripts (Adam with linear warm-up and an
EMA copy), so each experiment states only its data, loss and budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss
from cdm_ood.jobs.training import fit, lr_factor


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
    """Minimise `loss_fn(model, generator)` with Adam and linear warm-up in the project's training loop
    (`cdm_ood.jobs.training.fit`); returns the EMA model and the wall time in seconds."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    ema.n_averaged.fill_(1)  # average from the initial weights on, not from the first step's
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(warmup_steps, decay_every=1, decay_factor=1.0))
    start = time.perf_counter()
    fit(model, range(steps), lambda _: SimpleNamespace(loss=loss_fn(model, g)), opt, warmup, ema)
    return ema.module.eval(), time.perf_counter() - start


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
