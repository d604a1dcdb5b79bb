"""cdm-ood: out-of-distribution detection with Classification Diffusion Models."""

from importlib.metadata import PackageNotFoundError, version

from .classifier import CDMClassifier
from .denoiser import predict_noise, predict_x0
from .likelihood import bits_per_dim, log_likelihood, log_likelihood_profile, log_standard_normal
from .losses import CDMLoss, cdm_loss
from .schedules import NoiseSchedule, diffuse

try:
    __version__ = version("cdm-ood")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CDMClassifier",
    "CDMLoss",
    "NoiseSchedule",
    "__version__",
    "bits_per_dim",
    "cdm_loss",
    "diffuse",
    "log_likelihood",
    "log_likelihood_profile",
    "log_standard_normal",
    "predict_noise",
    "predict_x0",
]
