"""`cdm-ood train`: train a CDM from a YAML config (single process, or one rank of a torchrun job)."""

from __future__ import annotations

import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import click

from cdm_ood.configs import bundled_names

from .common import mlflow_option, setup_logging, tracking_uri_option


@click.command("train")
@click.option("--config", "config_path",
              help=f"YAML config: a path, or a bundled name: {', '.join(bundled_names())}.")  # fmt: skip
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.steps=200."
)
@click.option("--out-dir", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder [default: runs/<name>-<time>].")  # fmt: skip
@click.option("--resume", type=click.Path(exists=True, path_type=Path),
              help="Checkpoint (or run folder) to continue, in its MLflow run.")  # fmt: skip
@mlflow_option
@tracking_uri_option
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
def train_command(
    config_path: Optional[str],
    overrides: tuple[str, ...],
    out: Optional[Path],
    resume: Optional[Path],
    mlflow: bool,
    tracking_uri: Optional[str],
    dry_run: bool,
) -> None:
    """Train a classification diffusion model.

    With no arguments, trains the embedded default (bundled MNIST digits, a small MONAI UNet) on the CPU in
    a few minutes. Multi-GPU or multi-node: `torchrun --nproc_per_node=N -m cdm_ood.cli train ...`.
    """
    from cdm_ood.integrations.tracking import MlflowCallback, RunFolderCallback
    from cdm_ood.jobs.config import ConfigError, bundled_config, load_config
    from cdm_ood.jobs.training import latest_checkpoint, train
    from cdm_ood.jobs.validation import calibrate_on_validation
    from cdm_ood.model.checkpoint import TrainingState, load_checkpoint
    from cdm_ood.utils.distributed import Distributed

    rank = Distributed.from_env().rank
    setup_logging(rank)
    try:
        base, checkpoint, state = None, None, None
        if resume is not None:
            checkpoint = latest_checkpoint(resume)
            stored = load_checkpoint(checkpoint)
            base, state = stored["config"], TrainingState.from_checkpoint(checkpoint, stored)
            if config_path is not None:
                raise ConfigError("--resume continues the stored config; change it with --set, not --config")
        config = load_config(bundled_config(config_path) if config_path else None, list(overrides), base=base)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if dry_run:
        click.echo(config.to_yaml(), nl=False)
        return
    if out is None:
        out = (
            checkpoint.parent.parent
            if checkpoint is not None
            else Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
        )
    callbacks = [RunFolderCallback(out)]
    if config.tracking.enabled and mlflow:
        callbacks.append(MlflowCallback(tracking_uri or config.tracking.uri, config.tracking.experiment,
                                        config.tracking.run_name, state and state.run_id))  # fmt: skip
    signal.signal(signal.SIGTERM, _exit_on_signal)
    model_path = train(config, out, resume=state, callbacks=callbacks, finish=[calibrate_on_validation])
    if rank == 0:
        click.echo(f"checkpoint: {model_path}")


def _exit_on_signal(signum: int, frame) -> None:
    """SIGTERM (a scheduler's or torchrun's stop) as `SystemExit(128 + signum)`: training stops like on Ctrl-C,
    its MLflow run ends KILLED, and the exit status is the shell's for that signal."""
    sys.exit(128 + signum)
