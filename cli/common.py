"""Helpers shared by the commands: logging set-up, bundled-config lookup, checkpoint opening."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # usage errors and unusable checkpoints (every `cdm_ood.errors.CdmOodError`)


def setup_logging(rank: int = 0) -> None:
    """cdm_ood log lines to stderr; ranks other than 0 of a torchrun job report warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank {rank} %(message)s",
        datefmt="%H:%M:%S",
    )


def bundled_config(name_or_path: str) -> Path:
    """A config path as given, or the bundled `configs/<name>.yaml` when no such file exists."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    bundled = Path(str(files("cdm_ood.configs") / f"{name_or_path}.yaml"))
    return bundled if bundled.exists() else path


def open_checkpoint(path: Path, device: str = "cpu") -> Any:
    """The scoring model of a checkpoint; a `CheckpointError` (unsafe, broken, implausible) becomes exit 2."""
    from cdm_ood.checkpoint import load_model

    return load_model(path, device)
