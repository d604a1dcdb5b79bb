"""Helpers shared by the commands: logging set-up, checkpoint opening, and the options several commands take."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

EXIT_USAGE = 2  # usage errors and unusable checkpoints (every `cdm_ood.errors.CdmOodError`)


def setup_logging(rank: int = 0) -> None:
    """cdm_ood log lines to stderr; ranks other than 0 of a torchrun job report warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank {rank} %(message)s",
        datefmt="%H:%M:%S",
    )


def resolve_device(device: str) -> str:
    """The torch device a command runs the model on: `auto` is cuda:LOCAL_RANK (this process's GPU under
    torchrun) when CUDA is available, else cpu; any other name is checked to exist here."""
    import torch

    from cdm_ood.distributed import Distributed
    from cdm_ood.errors import UsageError

    if device == "auto":
        return f"cuda:{Distributed.from_env().local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device}: {err}") from None
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def open_checkpoint(path: Path, device: str = "cpu") -> Any:
    """The scoring model of a checkpoint; a `CheckpointError` (unsafe, broken, implausible) becomes exit 2."""
    from cdm_ood.checkpoint import load_model

    return load_model(path, device)


# Options shared by several commands, declared once.
checkpoint_option = click.option(
    "--checkpoint", required=True, type=click.Path(path_type=Path), help="model.pt of a training run."
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: resolve_device(value),
    help="Where the model runs: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or cuda:N.",
)
tracking_uri_option = click.option(
    "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here]."
)
