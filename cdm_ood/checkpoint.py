"""The one checkpoint writer and the one checkpoint reader. Reading always uses `torch.load(weights_only=True)`:
a file that needs pickle code to load is refused before anything in it runs."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from monai.transforms import Compose

from .classifier import CDMClassifier
from .data.presets import IntensityPreset
from .data.transforms import image_transform
from .errors import CdmOodError
from .io import atomic_path
from .schedules import NoiseSchedule

FORMAT = "cdm-ood/1"
REQUIRED = ("format", "step", "config", "schedule", "preset", "data", "ema")


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
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (missing {', '.join(missing) or 'format'})")
    return payload


def ema_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA weights (the model used for scoring) as a plain `CDMClassifier` state dict."""
    return {k.removeprefix("module."): v for k, v in payload["ema"].items() if k.startswith("module.")}


@dataclass
class LoadedModel:
    """Everything scoring needs from a checkpoint: the EMA classifier (eval mode), its schedule and preset."""

    classifier: CDMClassifier
    schedule: NoiseSchedule
    preset: IntensityPreset
    data: dict[str, Any]
    config: dict[str, Any]
    step: int
    ood: Optional[dict[str, Any]] = None

    def input_transform(self) -> Compose:
        """Images in their own units -> model input: the stored preset and size, exactly as in training."""
        return image_transform(self.preset, self.data["size"], self.data["channels"], multiple=1)


def build_classifier(config: dict[str, Any], schedule: NoiseSchedule) -> CDMClassifier:
    """The `CDMClassifier` described by a (resolved) config dict."""
    model, data = config["model"], config["data"]
    return CDMClassifier(
        spatial_dims=len(data["size"]),
        in_channels=data["channels"],
        T=schedule.T,
        channels=tuple(model["channels"]),
        attention_levels=tuple(model["attention_levels"]),
        num_res_blocks=model["num_res_blocks"],
        num_classes=model["num_classes"],
        norm_num_groups=model["norm_num_groups"],
        num_head_channels=model["num_head_channels"],
    )


def check_spec(path: str | Path, payload: dict[str, Any]) -> NoiseSchedule:
    """Validate the stored model spec (config and schedule) against the config schema and its sane bounds before
    anything is built, and return the schedule; a crafted spec cannot make loading allocate gigabytes."""
    from .config import ConfigError, load_config

    try:
        config = load_config(base=payload["config"])
        schedule = NoiseSchedule.from_config(config.schedule)
        if payload["schedule"] != schedule.to_dict():
            raise ConfigError(f"schedule: the stored schedule {payload['schedule']} is not the config's")
        return schedule
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
    schedule = check_spec(path, payload)
    state = ema_state(payload)
    check_weights(path, state)
    classifier = build_classifier(payload["config"], schedule)
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({err})") from None
    return LoadedModel(
        classifier=classifier.to(device).eval(),
        schedule=schedule,
        preset=IntensityPreset.from_dict(payload["preset"]),
        data=payload["data"],
        config=payload["config"],
        step=payload["step"],
        ood=payload.get("ood"),
    )
