"""The trained detector as an MLflow pyfunc model: raw images in; OOD score, verdict, threshold and
log-likelihood out; or whole volumes in (a stack of slices, or a NIfTI file's bytes) and the `cdm-ood score`
report's rows out, volume checks included. Served over REST by `mlflow models serve` (files on Spark:
`cdm_ood.integrations.spark`).

It is logged "from code" (`cdm_ood/integrations/mlflow_model.py`), so MLflow pickles nothing: the checkpoint (weights,
preset, calibrated detector and threshold) travels as an artifact and is read with `weights_only=True`.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from ..data.records import Slice, SliceSource, Volume
from ..errors import UsageError
from ..ood import OODDetector
from ..utils.distributed import resolve_device
from .cancellation import current_request

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
OUTPUT_COLUMNS = ["score", "ood", "verdict", "reason", "threshold", "log_likelihood", "bits_per_dim"]
IMAGE_COLUMN = "image"
VOLUME_COLUMN = "volume"  # a request of whole volumes: one stack of slices per row
FILE_COLUMN = "file"  # a request of whole volumes: one NIfTI file's bytes (base64 text in JSON) per row
GZIP_MAGIC = b"\x1f\x8b"  # a .nii.gz file's first bytes


def model_images(
    model_input: np.ndarray | pd.DataFrame | Sequence, spatial_dims: int = 2
) -> np.ndarray | list[np.ndarray]:
    """The images of a pyfunc input, in the files' units and of any size: a float array (B, C, H, W) or (B, H, W);
    a DataFrame with one image per row in its `image` column (or its only column), each a nested list or array
    (H, W) or (C, H, W), as `mlflow models serve` passes `dataframe_split`/`dataframe_records` JSON and Spark an
    array column; or a sequence of such images. For a 3D model (`spatial_dims` 3) the images are whole volumes:
    (B, C, D, H, W) or (B, D, H, W) arrays, cells (D, H, W) or (C, D, H, W)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            column = model_input[IMAGE_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise UsageError(f"a DataFrame input needs an {IMAGE_COLUMN!r} column (one image per row), got columns "
                             f"{list(model_input.columns)[:10]}")  # fmt: skip
        return [_image(cell) for cell in column]
    if isinstance(model_input, np.ndarray) or not isinstance(model_input, Sequence):
        images = np.asarray(model_input, dtype=np.float32)
        return images[:, None] if images.ndim == spatial_dims + 1 else images
    return [_image(image) for image in model_input]


def _image(cell: Any) -> np.ndarray:
    """One image (H, W) or (C, H, W) as float32, also from nested object arrays (Spark arrays of arrays)."""
    if isinstance(cell, np.ndarray) and cell.dtype == object:
        return np.stack([_image(row) for row in cell])
    return np.asarray(cell, dtype=np.float32)


def score_array(detector: OODDetector, images: np.ndarray | pd.DataFrame | Sequence) -> pd.DataFrame:
    """Per image (see `model_images`; each mapped to the model's input with its stored preset and size, as in
    `cdm-ood score`): the detector's score, the verdict and reason (as in the `cdm-ood score` report: NaN/inf or
    constant images are `flagged`, score NaN, `ood` True), log p_0(x) in nats and bits/dim, from one forward pass
    (Theorem 3.2). Served, it scores in batches of the detector's `batch_size` and stops with `AbandonedRequestError`
    between two when its request was given up (`cdm_ood.integrations.cancellation`)."""
    from ..diffusion.likelihood import bits_per_dim
    from ..ood.features import concat_features
    from ..ood.inputs import iter_images
    from ..ood.report import IN, judge

    needs, spec = ("profile", *detector.detector.required()), detector.model.spec
    one_by_one = [image for image, _, _ in iter_images(model_images(images, spec.spatial_dims), spec.channels,
                                                       spatial_dims=spec.spatial_dims)]  # fmt: skip
    request, parts, flags = current_request(), [], []
    for start in range(0, max(len(one_by_one), 1), detector.batch_size):  # no images: one empty batch
        if request is not None:
            request.check(start, len(one_by_one))
        part, part_flags = detector.checked_features(one_by_one[start : start + detector.batch_size], needs)
        parts.append(part)
        flags += part_flags
    features = concat_features(parts)
    score = detector.score_features(features)
    verdicts = [judge(float(s), detector.threshold, f) for s, f in zip(score, flags, strict=True)]
    ll = features["profile"][:, 0].double()
    return pd.DataFrame({
        "score": score,
        "ood": [v != IN for v, _ in verdicts],
        "verdict": [v for v, _ in verdicts],
        "reason": [r for _, r in verdicts],
        "threshold": np.full(len(score), detector.threshold),
        "log_likelihood": ll.numpy(),
        "bits_per_dim": bits_per_dim(ll, detector.num_dims, spec.bit_depth).numpy(),
    })  # fmt: skip


def score_volumes(detector: OODDetector, frame: pd.DataFrame) -> pd.DataFrame:
    """The `cdm-ood score` report's rows (`report.COLUMNS`: a row per slice, a row per volume with its volume checks)
    of whole volumes sent in one request, one per row of `frame`, named `volume-<row>` in the rows (a file
    `volume-<row>.nii.gz`; no name comes from the client). In its `volume` column a stack (D, H, W) or (C, D, H, W)
    of slices in the order the readers give them (a NIfTI file's third voxel axis), scored as
    `OODDetector.score_frame` scores `Slice`s; in its `file` column a NIfTI file's bytes (base64 text as JSON
    carries them, or bytes), staged in a temporary folder and scored as `cdm-ood score` scores the file, so a file
    that cannot be read gets its `unreadable` row. Served, it stops with `AbandonedRequestError` between two
    volumes when its request was given up."""
    from ..ood.report import COLUMNS
    from ..ood.staging import StagedFiles

    request, frames = current_request(), []
    with tempfile.TemporaryDirectory(prefix="cdm-ood-request-") as tmp:
        staged = StagedFiles(Path(tmp))
        for i, row in enumerate(frame.to_dict("records")):
            if request is not None:
                request.check(i, len(frame))
            content, name = row.get(FILE_COLUMN), f"volume-{i}"
            if isinstance(content, (str, bytes)) and content:
                data = _file_bytes(content, name)
                path = staged.add(f"{name}{'.nii.gz' if data[:2] == GZIP_MAGIC else '.nii'}", data)
                rows = [staged.restore(r) for r in detector.score_frame(path).to_dict("records")]
                frames.append(pd.DataFrame(rows, columns=list(COLUMNS)))
            else:
                frames.append(
                    detector.score_frame(_stack(row.get(VOLUME_COLUMN), name, detector.model.spec.spatial_dims))
                )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def _file_bytes(content: str | bytes, name: str) -> bytes:
    if isinstance(content, bytes):
        return content
    try:
        return base64.b64decode(content, validate=True)
    except ValueError:
        raise UsageError(f"{name}: the {FILE_COLUMN!r} column holds a file's bytes as base64 text") from None


def _stack(cell: Any, name: str, spatial_dims: int) -> list[Slice] | list[Volume]:
    """A request's stack (D, H, W) or (C, D, H, W) as the readers give a file named `name`: its slices, or one
    volume for a 3D model."""
    try:
        stack = _image(cell)
    except (TypeError, ValueError):
        stack = np.zeros(0)
    stack = stack[None] if stack.ndim == 3 else stack
    if stack.ndim != 4:
        raise UsageError(f"{name}: a volume is a stack (D, H, W) or (C, D, H, W) of numbers or a file's bytes, got "
                         f"{type(cell).__name__} of shape {stack.shape}")  # fmt: skip
    if spatial_dims == 3:
        return [Volume(stack, SliceSource(name, 0, name))]
    return [Slice(stack[:, k], SliceSource(name, k, name)) for k in range(stack.shape[1])]


def predict(detector: OODDetector, model_input: np.ndarray | pd.DataFrame | Sequence) -> pd.DataFrame:
    """What the served model answers: `score_volumes` for a DataFrame with a `volume` or `file` column, else
    `score_array`."""
    if isinstance(model_input, pd.DataFrame) and {VOLUME_COLUMN, FILE_COLUMN} & set(model_input.columns):
        return score_volumes(detector, model_input)
    return score_array(detector, model_input)


class CDMPyfuncModel(PythonModel):
    """pyfunc wrapper: `predict` takes raw images of any size (`model_images`) or whole volumes (`score_volumes`)."""

    def load_context(self, context: Any) -> None:
        """The checkpoint's detector on the serving machine's GPU when it has one, else its CPU."""
        self.detector = OODDetector.from_checkpoint(context.artifacts["checkpoint"], device=resolve_device())

    # An ndarray type hint: MLflow infers no schema from it, so it enforces none (images come in any size, also as
    # a DataFrame) and asks for no other hint.
    def predict(self, context: Any, model_input: np.ndarray, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        """Score, verdict, threshold, log-likelihood and bits/dim per image; the report's rows per whole volume
        (`predict`)."""
        return predict(self.detector, model_input)


def pip_requirements() -> list[str]:
    """cdm-ood's dependencies at their installed versions, installable on other machines: a local version label
    (the `+cpu` of a CPU build of torch) is dropped, so that pip picks the build that suits the serving machine."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    runtime = [Requirement(r) for r in requires("cdm-ood") or ()]
    return [f"{r.name}=={Version(version(r.name)).public}" for r in runtime
            if r.marker is None or r.marker.evaluate({"extra": ""})]  # fmt: skip


def log_pyfunc_model(checkpoint: str | Path, name: str = "model", registered_model_name: Optional[str] = None) -> Any:
    """Log the checkpoint as a pyfunc model in the active MLflow run (the cdm_ood code, an output signature, an
    input example, pinned requirements); with `registered_model_name`, also register it. Returns MLflow's
    `ModelInfo`. The signature has no input schema: MLflow would enforce one shape and dtype."""
    import mlflow
    from mlflow.models import ModelSignature

    detector = OODDetector.from_checkpoint(checkpoint)
    model = detector.model
    example = np.zeros((2, model.spec.channels, *model.spec.size), dtype=np.float32)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parent)],
        signature=ModelSignature(outputs=mlflow.models.infer_signature(score_array(detector, example)).inputs),
        input_example=example,
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
