"""cdm-ood: out-of-distribution detection with Classification Diffusion Models.

The public names are imported on first use, so that `import cdm_ood` (and `cdm-ood --help`) stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("cdm-ood")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "CDMClassifier": "classifier",
    "CDMLoss": "losses",
    "NoiseSchedule": "schedules",
    "OODDetector": "ood",
    "ScoreOODd": "ood",
    "bits_per_dim": "likelihood",
    "cdm_loss": "losses",
    "denoise": "sampling",
    "diffuse": "schedules",
    "log_likelihood": "likelihood",
    "log_likelihood_profile": "likelihood",
    "log_standard_normal": "likelihood",
    "predict_noise": "denoiser",
    "predict_x0": "denoiser",
    "rank_restorations": "ranking",
    "sample": "sampling",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from .classifier import CDMClassifier as CDMClassifier
    from .denoiser import predict_noise as predict_noise
    from .denoiser import predict_x0 as predict_x0
    from .likelihood import bits_per_dim as bits_per_dim
    from .likelihood import log_likelihood as log_likelihood
    from .likelihood import log_likelihood_profile as log_likelihood_profile
    from .likelihood import log_standard_normal as log_standard_normal
    from .losses import CDMLoss as CDMLoss
    from .losses import cdm_loss as cdm_loss
    from .ood import OODDetector as OODDetector
    from .ood import ScoreOODd as ScoreOODd
    from .ranking import rank_restorations as rank_restorations
    from .sampling import denoise as denoise
    from .sampling import sample as sample
    from .schedules import NoiseSchedule as NoiseSchedule
    from .schedules import diffuse as diffuse


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cdm_ood' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
