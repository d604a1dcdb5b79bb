"""OOD detection with a trained CDM: detectors on the likelihood profile, calibration, batch scoring, reports."""

from .api import OODDetector
from .calibration import DEFAULT_DETECTOR, DEFAULT_FPR, calibrate, resolve_threshold, threshold_at_fpr
from .detectors import DETECTORS, Detector, MultiscaleDetector, NLLDetector, NotFittedError, register_detector
from .transforms import ScoreOODd

__all__ = [
    "DEFAULT_DETECTOR", "DEFAULT_FPR", "DETECTORS", "Detector", "MultiscaleDetector", "NLLDetector", "NotFittedError",
    "OODDetector", "ScoreOODd", "calibrate", "register_detector", "resolve_threshold", "threshold_at_fpr",
]  # fmt: skip
