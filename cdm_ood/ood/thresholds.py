"""`Thresholds`: what a run judges with, resolved once from `--threshold` and then fixed: the detector's score
threshold and the calibrated volume checks with theirs. Scoring (`ImageScorer`) holds none of it, so that batch,
shards and gate take the two side by side and no step reads a threshold back out of a detector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ..model.checkpoint import LoadedModel
from .calibration import load_volume_checks, resolve_threshold
from .scoring import ImageScorer
from .volume_checks import VolumeCheck, check_names


@dataclass(frozen=True)
class Thresholds:
    """The score threshold (`score`, in the detector's units) and the volume checks that apply (`checks`, each with
    its threshold and whether it stops the gate)."""

    score: float
    checks: tuple[VolumeCheck, ...] = ()

    @classmethod
    def resolve(
        cls, scorer: ImageScorer, spec: str | float = "auto", report_only: Optional[Sequence[str]] = None
    ) -> Thresholds:
        """The thresholds of `scorer`'s calibration at `spec`: `auto` (the calibrated false-positive rate), `fpr:<x>`
        or a number in score units (`calibration.resolve_threshold`); the scorer's volume checks share the same
        false-positive rate (the calibrated one for a number), each at its 1/k (`calibration.load_volume_checks`).
        Those in `report_only` (default: the model configuration's `gate.report_only`) are reported, not stopping."""
        report_only = configured_report_only(scorer.model) if report_only is None else check_names(report_only)
        score = resolve_threshold(spec, scorer.id_scores, scorer.fpr)
        return cls(score, load_volume_checks(scorer.model.calibration, spec, scorer.volume_checks, report_only))


def configured_report_only(model: LoadedModel) -> tuple[str, ...]:
    """The volume checks the model's configuration reports without stopping the gate (`gate.report_only`)."""
    return check_names(model.config.get("gate", {}).get("report_only", ()))
