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


def open_checkpoint(path: Path, device: str = "cpu") -> Any:
    """The scoring model of a checkpoint; a `CheckpointError` (unsafe, broken, implausible) becomes exit 2."""
    from cdm_ood.checkpoint import load_model

    return load_model(path, device)


# Options shared by several commands, declared once.
checkpoint_option = click.option(
    "--checkpoint", required=True, type=click.Path(path_type=Path), help="model.pt of a training run."
)
tracking_uri_option = click.option(
    "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here]."
)
