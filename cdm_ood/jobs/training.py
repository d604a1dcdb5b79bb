"""The training loop (Algorithm 1 with EMA, warm-up and step decay), single process or DDP under torchrun.

All randomness of a step (noise levels t, noise, label drops, flips) is drawn for the *global* batch from one
generator shared by every rank, and each rank takes its rows; together with `DistributedSampler` this makes N
processes with batch B compute exactly what one process computes with batch N x B, and makes a resumed run
continue exactly. Logging, MLflow and file output leave through `callbacks` (see `cdm_ood.integrations.tracking`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from ..data.errors import DataError
from ..data.medical import SPLITS, medical_dataset
from ..data.natural import load_natural
from ..data.phantom_sets import make_phantoms
from ..data.presets import IntensityPreset, ct_preset, make_preset
from ..data.transforms import ImageTransformd
from ..diffusion.likelihood import bits_per_dim, log_likelihood_profile
from ..diffusion.losses import CDMLoss, cdm_loss
from ..diffusion.schedules import NoiseSchedule
from ..errors import UsageError
from ..model.checkpoint import TrainingState, save_checkpoint
from ..utils.distributed import Distributed
from ..utils.precision import autocast
from .config import Config, DataConfig

log = logging.getLogger("cdm_ood.jobs.training")


class Callback(Protocol):
    """Receives what the loop produces; only rank 0 calls it. After `on_start`, a run ends in `on_end` or, when
    an exception (`Exception`: failed) or an interruption (KeyboardInterrupt, SystemExit: killed) stops it, in
    `on_abort`. `checkpoint_entries` are stored in every checkpoint (e.g. the MLflow run id, for `--resume`)."""

    def on_start(self, config: Config, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_end(self, model_path: Path) -> None: ...
    def on_abort(self, error: BaseException) -> None: ...
    def checkpoint_entries(self) -> dict[str, Any]: ...


Finisher = Callable[..., dict[str, Any]]  # (ema model, TrainingData, Config, NoiseSchedule, device) -> entries


@dataclass
class TrainingData:
    """Train and validation datasets (already mapped to the model's input), the fitted preset and statistics."""

    train: CacheDataset
    val: CacheDataset
    preset: IntensityPreset
    stats: dict[str, Any] = field(default_factory=dict)


def ensure_phantoms(cfg: DataConfig) -> None:
    """Generate the configured phantoms into `data.root` if that folder does not exist yet."""
    p = cfg.phantoms
    if cfg.dataset == "folder" and p is not None and not Path(cfg.root).exists():
        log.info("generating %d %s %s phantoms into %s", p.n, p.anatomy, p.modality, cfg.root)
        make_phantoms(
            cfg.root, p.n, p.format, size=p.size, slices=p.slices, modality=p.modality, seed=p.seed, anatomy=p.anatomy
        )


def load_splits(
    cfg: DataConfig, manifest: Optional[Path], on_error: Callable[[DataError], None]
) -> dict[str, list[dict]]:
    """Raw dict samples per split for the configured dataset (a split manifest is written for folders)."""
    if cfg.dataset != "folder":
        return {split: load_natural(cfg.dataset, split, root=cfg.root, seed=cfg.seed) for split in SPLITS}
    return medical_dataset(cfg.root, cfg.fractions, cfg.seed, manifest, on_error=on_error, volumes=cfg.volumes)


def fit_preset(cfg: DataConfig, train_samples: Sequence[dict]) -> IntensityPreset:
    """The fixed intensity preset; `mr` is fitted on the training split only."""
    if cfg.preset == "ct":
        return ct_preset(cfg.window)
    return make_preset(cfg.preset, images=[s["image"] for s in train_samples] if cfg.preset == "mr" else None)


def build_data(
    cfg: DataConfig, manifest: Optional[Path], on_error: Callable[[DataError], None], num_classes: Optional[int]
) -> TrainingData:
    splits = load_splits(cfg, manifest, on_error)
    if num_classes is not None:
        bad = {s["label"] for split in splits.values() for s in split} - set(range(num_classes))
        if bad:
            raise UsageError(f"model.num_classes={num_classes} but the data has labels {sorted(bad)[:5]}")
    if not splits["train"] or not splits["val"]:
        sizes = {k: len(v) for k, v in splits.items()}
        raise UsageError(f"training needs non-empty train and val splits, got {sizes}")
    preset = fit_preset(cfg, splits["train"])
    transform = ImageTransformd("image", preset, cfg.size, cfg.channels, multiple=1)
    train, val = (CacheDataset(splits[k], transform, progress=False) for k in ("train", "val"))
    stats = {
        "dataset": cfg.dataset,
        "size": list(cfg.size),
        "channels": cfg.channels,
        "bit_depth": cfg.bit_depth,
        **{f"n_{k}": len(v) for k, v in splits.items()},
    }
    return TrainingData(train, val, preset, stats)


def lr_factor(warmup_steps: int, decay_every: int, decay_factor: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps`, then x`decay_factor` every `decay_every` steps (LambdaLR factor)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * decay_factor ** (step // decay_every)

    return factor


def draw_step_randomness(
    generator: torch.Generator, config: Config, schedule: NoiseSchedule, image_shape: Sequence[int], world: int
) -> dict[str, torch.Tensor]:
    """t, noise, label-drop and flip draws for the global batch (batch_size x world), in global order."""
    n = config.train.batch_size * world
    return {
        "t": torch.randint(0, schedule.num_classes, (n,), generator=generator),
        "noise": torch.randn((n, *image_shape), generator=generator),
        "drop": torch.rand(n, generator=generator) < config.loss.label_dropout,
        "flip": torch.rand(n, generator=generator) < config.train.flip_prob,
    }


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of an epoch (the incomplete last batch is dropped)."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def pick_device(config: Config, ddp: Distributed) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


@torch.no_grad()
def dataset_profiles(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    conditional: bool = False,
) -> torch.Tensor:
    """log p_t(x), t = 0..T+1 (Theorem 3.2), of every image of `dataset`, (N, T+2) nats on the CPU; with
    `conditional`, given each image's label."""
    profiles = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        labels = batch["label"].to(device) if conditional else None
        profiles.append(log_likelihood_profile(model, batch["image"].to(device), schedule, labels).cpu())
    return torch.cat(profiles)


def validate(model: torch.nn.Module, val: CacheDataset, config: Config, schedule: NoiseSchedule, device) -> dict:
    """Bits/dim (offset for `data.bit_depth`) and nats/dim of the first `val_samples` validation images."""
    subset = torch.utils.data.Subset(val, range(min(config.train.val_samples, len(val))))
    conditional = config.model.num_classes is not None
    ll = dataset_profiles(model, schedule, subset, config.train.batch_size, device, conditional)[:, 0].double()
    dims = val[0]["image"].numel()
    return {
        "val_bpd": bits_per_dim(ll, dims, config.data.bit_depth).mean().item(),
        "val_nats_per_dim": (-ll / dims).mean().item(),
    }


def train(
    config: Config,
    out_dir: str | Path,
    resume: Optional[TrainingState] = None,
    callbacks: Sequence[Callback] = (),
    on_data_error: Callable[[DataError], None] = lambda err: log.warning("skipped %s", err),
    finish: Sequence[Finisher] = (),
) -> Path:
    """Train a CDM as configured, from `resume` (a full checkpoint's `TrainingState`) when given; returns the path
    of the final model checkpoint (`out_dir/model.pt`). `finish` callbacks run on the EMA model at the end and add
    their entries to that checkpoint: `cdm-ood train` passes the OOD calibration on the validation split
    (`jobs.validation.calibrate_on_validation`). The steps: start the processes, prepare the data, build the run,
    restore it, run `fit` with logging, validation and checkpoints after each step, finish."""
    ddp = start_processes(config)
    out_dir = Path(out_dir)
    data = prepare_data(config, out_dir, ddp, on_data_error)
    run = TrainingRun(config, data, pick_device(config, ddp), ddp, out_dir, callbacks if ddp.main else ())
    if resume is not None:
        run.restore(resume)
    final = run.run(finish)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def start_processes(config: Config) -> Distributed:
    """This process's place among torchrun's (its process group joined when there are several), its threads and
    its seed."""
    ddp = Distributed.from_env()
    if ddp.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and config.train.device != "cpu" else "gloo")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    return ddp


def prepare_data(
    config: Config, out_dir: Path, ddp: Distributed, on_data_error: Callable[[DataError], None]
) -> TrainingData:
    """The configured phantoms generated once (rank 0, the others wait), then every rank's datasets; rank 0 writes
    the split manifest."""
    if ddp.main:
        ensure_phantoms(config.data)
    ddp.barrier()
    manifest = out_dir / "split_manifest.csv" if ddp.main else None
    return build_data(config.data, manifest, on_data_error, config.model.num_classes)


class TrainingRun:
    """One run of Algorithm 1: the model, its EMA, the optimizer, the scheduler and the generator of each step's
    draws (`state`, `restore`), the global batches from the current step (`batches`), the loss (`loss`), what
    happens after each step (`after_step`: log, validate, checkpoint) and the end (`run`)."""

    def __init__(
        self, config: Config, data: TrainingData, device: torch.device, ddp: Distributed, out_dir: Path,
        callbacks: Sequence[Callback],
    ) -> None:  # fmt: skip
        self.config, self.data, self.device, self.ddp, self.out_dir = config, data, device, ddp, out_dir
        self.callbacks = callbacks
        self.spec = config.model_spec(data.preset)
        self.schedule = self.spec.noise_schedule()
        self.model = self.spec.build_classifier().to(device)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay),
                                 use_buffers=True)  # fmt: skip
        # default mode: right for the double backward of the denoiser loss
        self.net = DistributedDataParallel(self.model) if ddp.world > 1 else self.model
        o = config.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(o.warmup_steps, o.decay_every, o.decay_factor)
        )
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.step = 0
        self.sampler = DistributedSampler(data.train, ddp.world, ddp.rank, shuffle=True, seed=config.train.seed,
                                          drop_last=True)  # fmt: skip
        self.batches_per_epoch = len(self.sampler) // config.train.batch_size
        if self.batches_per_epoch == 0:
            raise UsageError(f"train split ({len(data.train)} samples) smaller than one global batch")
        self.image_shape = data.train[0]["image"].shape
        self.timer = 0.0  # of the last logged step (`run` starts it)

    def state(self) -> TrainingState:
        return TrainingState(self.step, self.model.state_dict(), self.ema.state_dict(), self.optimizer.state_dict(),
                             self.scheduler.state_dict(), self.generator.get_state())  # fmt: skip

    def restore(self, state: TrainingState) -> None:
        self.model.load_state_dict(state.model)
        self.ema.load_state_dict(state.ema)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.generator.set_state(state.generator)
        self.step = state.step

    def save(self, path: Path, full: bool, **extra: Any) -> Path:
        """A checkpoint: the spec, config and EMA (the model for scoring) with `extra`; `full` adds the
        `TrainingState` that resuming needs."""
        payload = {**{k: v for cb in self.callbacks for k, v in cb.checkpoint_entries().items()}, **extra,
                   "step": self.step, "config": self.config.to_dict(), "spec": self.spec.to_dict(),
                   "ema": self.ema.state_dict()}  # fmt: skip
        return save_checkpoint(path, payload | (self.state().entries() if full else {}))

    def batches(self) -> Iterator[dict[str, Any]]:
        """This rank's share of each step's global batch with the step's draws, from `step` to the last step."""
        config, ddp = self.config, self.ddp
        epoch, position = divmod(self.step, self.batches_per_epoch)
        while True:
            order = epoch_batches(self.sampler, epoch, config.train.batch_size)[position:]
            for batch in DataLoader(self.data.train, batch_sampler=order, num_workers=config.data.num_workers):
                draws = {k: v[ddp.rank :: ddp.world] for k, v in draw_step_randomness(
                    self.generator, config, self.schedule, self.image_shape, ddp.world).items()}  # fmt: skip
                flip = draws["flip"].view(-1, *[1] * len(self.image_shape))
                labels = None
                if config.model.num_classes is not None:
                    labels = torch.where(draws["drop"], self.model.null_label, batch["label"]).to(self.device)
                yield {"x0": torch.where(flip, batch["image"].flip(-1), batch["image"]).to(self.device),
                       "labels": labels, "t": draws["t"].to(self.device),
                       "noise": draws["noise"].to(self.device)}  # fmt: skip
            epoch, position = epoch + 1, 0

    def loss(self, batch: dict[str, Any]) -> CDMLoss:
        """Algorithm 1 on one batch, through the DDP wrapper (under bfloat16 autocast with `train.precision`)."""
        c = self.config.loss
        with autocast(self.device, self.config.train.precision):
            return cdm_loss(self.net, batch["x0"], self.schedule, ce_weight=c.ce_weight, mse_weight=c.mse_weight,
                            t=batch["t"], noise=batch["noise"], labels=batch["labels"])  # fmt: skip

    def after_step(self, done: int, out: CDMLoss) -> None:
        """Log, validate and checkpoint on the configured steps."""
        self.step, t = done, self.config.train
        if self.step % t.log_every == 0 or self.step == t.steps:
            elapsed, self.timer = time.perf_counter() - self.timer, time.perf_counter()
            metrics = {
                "loss": out.loss.item(), "mse": out.mse.item(), "ce": out.ce.item(),
                "accuracy": out.accuracy.item(), "lr": self.scheduler.get_last_lr()[0],
                "steps_per_s": min(t.log_every, self.step) / elapsed if elapsed > 0 else math.nan,
            }  # fmt: skip
            for cb in self.callbacks:
                cb.on_step(self.step, metrics)
        if self.ddp.main and (self.step % t.val_every == 0 or self.step == t.steps):
            metrics = validate(self.ema.module, self.data.val, self.config, self.schedule, self.device)
            for cb in self.callbacks:
                cb.on_validation(self.step, metrics)
        if self.ddp.main and (self.step % t.checkpoint_every == 0 or self.step == t.steps):
            path = self.save(self.out_dir / "checkpoints" / f"step_{self.step:07d}.pt", full=True)
            prune_checkpoints(path.parent, t.keep_last)
            for cb in self.callbacks:
                cb.on_checkpoint(self.step, path)

    def run(self, finish: Sequence[Finisher]) -> Path:
        """`fit` to the configured step count, then (rank 0) the `finish` hooks' entries into `model.pt`; the
        callbacks hear of the start and of the end, or of what stopped the run (the error propagates)."""
        config, data = self.config, self.data
        info = {"global_batch": config.train.batch_size * self.ddp.world, "world_size": self.ddp.world,
                "device": str(self.device), "parameters": sum(p.numel() for p in self.model.parameters()),
                "start_step": self.step, **data.stats}  # fmt: skip
        for cb in self.callbacks:
            cb.on_start(config, info)
        remaining = itertools.islice(self.batches(), max(0, config.train.steps - self.step))
        final, self.timer = self.out_dir / "model.pt", time.perf_counter()
        try:
            fit(self.model, remaining, self.loss, self.optimizer, self.scheduler, self.ema, config.optim.grad_clip,
                self.step, [self.after_step])  # fmt: skip
            if self.ddp.main:
                entries: dict[str, Any] = {}
                for hook in finish:
                    entries |= hook(self.ema.module, data, config, self.schedule, self.device)
                self.save(final, full=False, **entries)
                for cb in self.callbacks:
                    cb.on_end(final)
        except BaseException as err:  # failed or interrupted: the callbacks close their run, the error propagates
            for cb in self.callbacks:
                cb.on_abort(err)
            raise
        return final


def fit(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss: Callable[[Any], Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    ema: Optional[AveragedModel] = None,
    grad_clip: Optional[float] = None,
    step: int = 0,
    after_step: Sequence[Callable[[int, Any], None]] = (),
) -> int:
    """The one training loop: for each batch, `loss(batch)` (an object with a `.loss` tensor, e.g. `CDMLoss`),
    backward, optional gradient-norm clipping, an optimizer and a scheduler step, the EMA update; then each
    `after_step(step, output)` with the number of steps done. Returns that number."""
    for batch in batches:
        out = loss(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        for hook in after_step:
            hook(step, out)
    return step


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` newest `step_*.pt` files."""
    for old in sorted(folder.glob("step_*.pt"))[:-keep_last]:
        old.unlink(missing_ok=True)


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a file, else the newest `checkpoints/step_*.pt` of the run folder `path`."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("checkpoints/step_*.pt")) or sorted(path.glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoints/step_*.pt to resume from")
    return found[-1]
