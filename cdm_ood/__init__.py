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
    "CDMClassifier": "diffusion.classifier",
    "CDMLoss": "diffusion.losses",
    "NoiseSchedule": "diffusion.schedules",
    "OODDetector": "ood",
    "ScoreOODd": "ood",
    "bits_per_dim": "diffusion.likelihood",
    "cdm_loss": "diffusion.losses",
    "denoise": "diffusion.sampling",
    "diffuse": "diffusion.schedules",
    "log_likelihood": "diffusion.likelihood",
    "log_likelihood_profile": "diffusion.likelihood",
    "log_standard_normal": "diffusion.likelihood",
    "predict_noise": "diffusion.denoiser",
    "predict_x0": "diffusion.denoiser",
    "rank_restorations": "diffusion.ranking",
    "sample": "diffusion.sampling",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from .diffusion.classifier import CDMClassifier as CDMClassifier
    from .diffusion.denoiser import predict_noise as predict_noise
    from .diffusion.denoiser import predict_x0 as predict_x0
    from .diffusion.likelihood import bits_per_dim as bits_per_dim
    from .diffusion.likelihood import log_likelihood as log_likelihood
    from .diffusion.likelihood import log_likelihood_profile as log_likelihood_profile
    from .diffusion.likelihood import log_standard_normal as log_standard_normal
    from .diffusion.losses import CDMLoss as CDMLoss
    from .diffusion.losses import cdm_loss as cdm_loss
    from .diffusion.ranking import rank_restorations as rank_restorations
    from .diffusion.sampling import denoise as denoise
    from .diffusion.sampling import sample as sample
    from .diffusion.schedules import NoiseSchedule as NoiseSchedule
    from .diffusion.schedules import diffuse as diffuse
    from .ood import OODDetector as OODDetector
    from .ood import ScoreOODd as ScoreOODd


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cdm_ood' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
