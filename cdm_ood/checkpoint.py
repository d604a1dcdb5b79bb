"""The one checkpoint writer and the one checkpoint reader. Reading always uses `torch.load(weights_only=True)`:
a file that needs pickle code to load is refused before anything in it runs."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .classifier import CDMClassifier
from .errors import CdmOodError
from .io import atomic_path
from .schedules import NoiseSchedule
from .spec import Calibration, ModelSpec

FORMAT = "cdm-ood/2"
FORMER = "cdm-ood/1"  # the same content under other keys: read, then upgraded in memory
REQUIRED = ("format", "step", "config", "spec", "ema")
RUN_ID = "mlflow_run_id"  # optional: the MLflow run of the training (continued by `train --resume`)


class CheckpointError(CdmOodError):
    """A checkpoint that cannot be used: unreadable, not a cdm-ood checkpoint, or refused as unsafe."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (tensors and plain Python data only) to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`.

    Raises:
        CheckpointError: the file is missing, not a torch file, needs pickle code (refused: nothing from it was
            run), or lacks what a cdm-ood checkpoint holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if code is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file, or corrupt)") from None
        raise CheckpointError(
            f"{path}: refused: the file needs pickle code to load, which could run arbitrary code; nothing from it "
            f"was run ({code})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMER:
        payload = _upgrade(payload)
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (missing {', '.join(missing) or 'format'})")
    return payload


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A `cdm-ood/1` payload (spec spread over config, preset and data; calibration under "ood") as `cdm-ood/2`."""
    try:
        data, config = payload["data"], payload["config"]
        spec = {"model": config["model"], "schedule": config["schedule"], "preset": payload["preset"],
                "size": data["size"], "channels": data["channels"], "bit_depth": data["bit_depth"]}  # fmt: skip
    except (KeyError, TypeError):
        return payload
    rest = {k: v for k, v in payload.items() if k not in ("format", "data", "preset", "schedule", "ood")}
    calibration = {"calibration": payload["ood"]} if payload.get("ood") else {}
    return {**rest, "format": FORMAT, "spec": spec, **calibration}


def store_calibration(path: str | Path, calibration: Calibration) -> Path:
    """Write `calibration` into the checkpoint at `path` (atomically; the weights are unchanged)."""
    payload = load_checkpoint(path)
    payload["calibration"] = calibration.to_dict()
    return save_checkpoint(path, payload)


def training_run_id(path: str | Path, payload: dict[str, Any]) -> Optional[str]:
    """The id of the MLflow run that trained the checkpoint, None when it was not tracked (or is older)."""
    run_id = payload.get(RUN_ID)
    if run_id is not None and not isinstance(run_id, str):
        raise CheckpointError(f"{path}: {RUN_ID} must be a string, got {type(run_id).__name__}")
    return run_id


def ema_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA weights (the model used for scoring) as a plain `CDMClassifier` state dict."""
    return {k.removeprefix("module."): v for k, v in payload["ema"].items() if k.startswith("module.")}


@dataclass
class LoadedModel:
    """Everything scoring needs from a checkpoint: the EMA classifier (eval mode), its spec and schedule, its
    OOD calibration (None until calibrated) and the MLflow run that trained it (None when not tracked)."""

    classifier: CDMClassifier
    schedule: NoiseSchedule
    spec: ModelSpec
    config: dict[str, Any]
    step: int
    calibration: Optional[Calibration] = None
    training_run_id: Optional[str] = None

    @property
    def device(self) -> torch.device:
        """Where the classifier's weights are (`load_model(path, device)`)."""
        return next(self.classifier.parameters()).device


def check_spec(path: str | Path, payload: dict[str, Any]) -> ModelSpec:
    """The stored model spec, validated (types, structure, sane bounds) before anything is built: a crafted spec
    cannot make loading allocate gigabytes."""
    from .config import ConfigError

    try:
        return ModelSpec.from_dict(payload["spec"])
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: implausible model spec, refused before building it ({err})") from None


def check_weights(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights with NaN or inf entries: every score they gave would be meaningless."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); the model "
                              "cannot score")  # fmt: skip


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The scoring model of a checkpoint (EMA weights), on `device`, in eval mode; the spec is validated before
    the network is built and the weights are checked to be finite."""
    payload = load_checkpoint(path)
    spec = check_spec(path, payload)
    state = ema_state(payload)
    check_weights(path, state)
    classifier = spec.build_classifier()
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored model spec ({err})") from None
    calibration = payload.get("calibration")
    return LoadedModel(
        classifier=classifier.to(device).eval(),
        schedule=spec.noise_schedule(),
        spec=spec,
        config=payload["config"],
        step=payload["step"],
        calibration=Calibration.from_dict(calibration) if calibration else None,
        training_run_id=training_run_id(path, payload),
    )
