"""What scoring files asks of a detector: the `Scorer` protocol that `batch`, `shards` and `gate` are written
against. `OODDetector` (the Python API) is one; those modules never import it, so it can use them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ..checkpoint import LoadedModel
from .volume_checks import VolumeCheck


class Scorer(Protocol):
    """A calibrated detector with its threshold resolved: what one image is (`unit`, `slice` or `volume`), how a
    file's image becomes the model's input (`transform`), how a scored image becomes a report row (`report_row`:
    `report.slice_row` or `report.volume_row`), and the scores, statistics and maps of a model-space batch
    (`scored_prepared`)."""

    name: str
    unit: str
    model: LoadedModel
    precision: str
    batch_size: int
    checks: Sequence[VolumeCheck]
    transform: Callable[[Any], torch.Tensor]
    report_row: Callable[..., dict]

    @property
    def threshold(self) -> float: ...

    @property
    def device(self) -> torch.device: ...

    def scored_prepared(
        self, x: torch.Tensor, maps: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray], Optional[np.ndarray]]: ...
