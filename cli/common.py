"""Helpers shared by the commands: logging set-up, checkpoint opening, and the options several commands take."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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


def ignore_options(command: Callable) -> Callable:
    """`--exclude GLOB` (repeatable) and `--no-default-ignore`: what a walk through the input folders leaves out;
    the command receives them as `exclude` and `no_default_ignore` (see `ignore_globs`)."""
    command = click.option(
        "--no-default-ignore", is_flag=True,
        help="Also read the files that the default ignore list leaves out (*.csv, *.json, *.txt, README*, "
             "DICOMDIR, ...; see docs/data.md).",
    )(command)  # fmt: skip
    return click.option(
        "--exclude", multiple=True, metavar="GLOB",
        help="Leave out files and folders found in the input folders whose name or whole path matches GLOB "
             "(case-insensitive; repeatable; added to the default ignore list).",
    )(command)  # fmt: skip


def ignore_globs(exclude: Sequence[str], no_default_ignore: bool) -> tuple[str, ...]:
    """The globs a folder walk leaves out: `--exclude`, plus the default ignore list unless it is turned off."""
    from cdm_ood.data.walk import DEFAULT_IGNORE

    return (*(() if no_default_ignore else DEFAULT_IGNORE), *exclude)
