"""The trained detector as an MLflow pyfunc model: raw images in; OOD score, verdict, threshold and
log-likelihood out. Served over REST by `mlflow models serve`, on Spark by `mlflow.pyfunc.spark_udf`.

It is logged "from code" (`cdm_ood/mlflow_model.py`), so MLflow pickles nothing: the checkpoint (weights,
preset, calibrated detector and threshold) travels as an artifact and is read with `weights_only=True`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from .ood import OODDetector

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
OUTPUT_COLUMNS = ["score", "ood", "verdict", "reason", "threshold", "log_likelihood", "bits_per_dim"]


def score_array(detector: OODDetector, images: np.ndarray) -> pd.DataFrame:
    """Per image of a float array (B, C, H, W) or (B, H, W) in the files' units: the detector's score, the
    verdict and reason (as in the `cdm-ood score` report: NaN/inf or constant images are `flagged`, score NaN,
    `ood` True), log p_0(x) in nats and bits/dim, from one forward pass (Theorem 3.2)."""
    from .likelihood import bits_per_dim
    from .ood.report import IN, judge

    images = np.asarray(images, dtype=np.float32)
    batch = images[:, None] if images.ndim == 3 else images
    profile, flags = detector.checked_profile(batch)
    score = detector.score_profiles(profile)
    verdicts = [judge(float(s), detector.threshold, f) for s, f in zip(score, flags, strict=True)]
    ll = profile[:, 0].double()
    return pd.DataFrame({
        "score": score,
        "ood": [v != IN for v, _ in verdicts],
        "verdict": [v for v, _ in verdicts],
        "reason": [r for _, r in verdicts],
        "threshold": np.full(len(score), detector.threshold),
        "log_likelihood": ll.numpy(),
        "bits_per_dim": bits_per_dim(ll, detector.num_dims, detector.model.spec.bit_depth).numpy(),
    })  # fmt: skip


with warnings.catch_warnings():  # MLflow asks for predict() type hints here, which it would then enforce
    warnings.simplefilter("ignore", UserWarning)

    class CDMPyfuncModel(PythonModel):
        """pyfunc wrapper: `predict` takes a float array (B, C, H, W) or (B, H, W) of raw images."""

        def load_context(self, context: Any) -> None:
            self.detector = OODDetector.from_checkpoint(context.artifacts["checkpoint"])

        def predict(self, context, model_input, params=None):
            """Score, verdict, threshold, log-likelihood and bits/dim per image."""
            return score_array(self.detector, model_input)


def pip_requirements() -> list[str]:
    """The installed versions of the packages the model needs at load time."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "monai", "numpy", "pandas", "mlflow", "pydicom", "nibabel", "pillow", "scikit-learn", "pyyaml")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(checkpoint: str | Path, name: str = "model") -> Any:
    """Log the checkpoint as a pyfunc model in the active MLflow run (with a signature and the cdm_ood code)."""
    import mlflow
    from mlflow.models import infer_signature

    detector = OODDetector.from_checkpoint(checkpoint)
    model = detector.model
    example = np.zeros((2, model.spec.channels, *model.spec.size), dtype=np.float32)
    with warnings.catch_warnings():  # as above, when MLflow loads the model code to check it
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(__file__).parent)],
            signature=infer_signature(example, score_array(detector, example)),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
