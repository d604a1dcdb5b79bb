"""The trained model as an MLflow pyfunc model: raw images in, log-likelihood and bits/dim out.

It is logged "from code" (`cdm_ood/mlflow_model.py`), so MLflow pickles nothing: the checkpoint travels as an
artifact and is read with `weights_only=True`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from .checkpoint import LoadedModel, load_model
from .data.transforms import image_transform
from .likelihood import bits_per_dim, log_likelihood

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def score_array(model: LoadedModel, images: np.ndarray, batch_size: int = 64) -> pd.DataFrame:
    """Per image: log p_0(x) in nats and bits/dim, for raw images (B, C, *spatial) in the file's units."""
    transform = image_transform(model.preset, model.data["size"], model.data["channels"], multiple=1)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack([transform(img) for img in images[start : start + batch_size]])
            ll = log_likelihood(model.classifier, x, model.schedule).double()
            bpd = bits_per_dim(ll, x[0].numel(), model.data["bit_depth"])
            rows += [{"log_likelihood": a, "bits_per_dim": b} for a, b in zip(ll.tolist(), bpd.tolist(), strict=True)]
    return pd.DataFrame(rows, columns=["log_likelihood", "bits_per_dim"])


with warnings.catch_warnings():  # MLflow asks for predict() type hints here, which it would then enforce
    warnings.simplefilter("ignore", UserWarning)

    class CDMPyfuncModel(PythonModel):
        """pyfunc wrapper: `predict` takes a float array (B, C, *spatial) of raw images."""

        def load_context(self, context: Any) -> None:
            self.model = load_model(context.artifacts["checkpoint"])

        def predict(self, context, model_input, params=None):
            """Log-likelihood (nats) and bits/dim per image of a float array (B, C, *spatial)."""
            return score_array(self.model, np.asarray(model_input, dtype=np.float32))


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

    model = load_model(checkpoint)
    example = np.zeros((2, model.data["channels"], *model.data["size"]), dtype=np.float32)
    with warnings.catch_warnings():  # as above, when MLflow loads the model code to check it
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(__file__).parent)],
            signature=infer_signature(example, score_array(model, example)),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
