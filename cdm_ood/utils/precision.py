"""Network precision: float32, or the backbone under bfloat16 autocast (a GPU setting; the classifier's head, the
logits and every statistic computed from them stay float32, `classifier.CDMClassifier`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("float32", "bf16")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast on `device` for `precision` "bf16", a no-op context for "float32"."""
    import torch

    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
