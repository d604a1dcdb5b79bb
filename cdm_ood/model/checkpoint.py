"""The one checkpoint writer and the one checkpoint reader. Reading always uses `torch.load(weights_only=True)`:
a file that needs pickle code to load is refused before anything in it runs.

Every checkpoint written here carries the sha256 of its content (`DIGEST`, `content_digest`). The reader takes one
snapshot of the file, checks the CRC-32 of every zip member (torch does not), and recomputes the digest from what it
loaded: a file altered or corrupted after it was written is refused. A checkpoint written before digests existed
loads with a warning that it cannot be verified."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..diffusion.classifier import CDMClassifier
from ..diffusion.schedules import NoiseSchedule
from ..errors import CdmOodError
from ..utils.io import atomic_path
from .spec import Calibration, ModelSpec

FORMAT = "cdm-ood/2"
FORMER = "cdm-ood/1"  # the same content under other keys: read, then upgraded in memory
REQUIRED = ("format", "step", "config", "spec", "ema")
RUN_ID = "mlflow_run_id"  # optional: the MLflow run of the training (continued by `train --resume`)
DIGEST = "content_sha256"  # the sha256 of everything else in the checkpoint (`content_digest`)

log = logging.getLogger("cdm_ood.model.checkpoint")


class CheckpointError(CdmOodError):
    """A checkpoint that cannot be used: unreadable, not a cdm-ood checkpoint, or refused as unsafe."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (tensors and plain Python data only) to `path` atomically, with its `content_digest` (any
    digest in `payload` is replaced)."""
    path = Path(path)
    content = {"format": FORMAT, **{k: v for k, v in payload.items() if k != DIGEST}}
    with atomic_path(path) as tmp:
        torch.save({**content, DIGEST: content_digest(content)}, tmp)
    return path


def content_digest(payload: Mapping[str, Any]) -> str:
    """The sha256 (hex) of `payload` without its `DIGEST` entry, serialised canonically: mappings with their keys
    sorted, lists and tuples alike, each tensor as its dtype, shape and bytes, any other value as its type and repr
    (exact for floats). The same content gives the same digest however often it is loaded and saved again."""
    sha = hashlib.sha256()
    for chunk in _canonical({k: v for k, v in payload.items() if k != DIGEST}):
        sha.update(chunk)
    return sha.hexdigest()


def _canonical(value: Any) -> Iterator[bytes | memoryview]:
    """`value` serialised for `content_digest`, in chunks; every item is tagged with its type and size."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        yield _tag(f"tensor {flat.dtype} {tuple(value.shape)}")
        yield memoryview(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        yield _tag(f"mapping {len(value)}")
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            yield from _canonical(key)
            yield from _canonical(value[key])
    elif isinstance(value, (list, tuple)):
        yield _tag(f"sequence {len(value)}")
        for item in value:
            yield from _canonical(item)
    else:
        yield _tag(f"{type(value).__name__} {value!r}")


def _tag(text: str) -> bytes:
    """`text` in UTF-8 after its length: no two sequences of tags run together into the same bytes."""
    data = text.encode()
    return len(data).to_bytes(8, "little") + data


def _read_verified_zip(path: Path) -> bytes:
    """The file's bytes, read once (torch then loads this snapshot: a checkpoint replaced while it is read cannot
    mix two versions), after every zip member's CRC-32 was checked."""
    data = path.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch zip archive: {err})") from None
    with archive:
        for member in archive.infolist():
            try:
                with archive.open(member) as stream:
                    while stream.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
                raise CheckpointError(f"{path}: refused: zip member {member.filename} is damaged ({err}); the file "
                                      "was altered or corrupted after it was written") from None  # fmt: skip
    return data


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True` from one snapshot of the file whose zip CRCs and
    content digest were verified; `payload[DIGEST]` is its `content_digest` (computed, with a warning, for a
    checkpoint written before digests existed).

    Raises:
        CheckpointError: the file is missing, not a torch file, needs pickle code (refused: nothing from it was
            run), fails a zip CRC or its content digest (altered or corrupted after it was written), or lacks what
            a cdm-ood checkpoint holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = _read_verified_zip(path)
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (holds a {type(payload).__name__}, not a dict)")
    digest, stored = content_digest(payload), payload.get(DIGEST)
    if stored is not None and stored != digest:
        raise CheckpointError(f"{path}: refused: content hash mismatch: the file was altered or corrupted after it "
                              "was written")  # fmt: skip
    if payload.get("format") == FORMER:
        payload = _upgrade(payload)
    missing = [k for k in REQUIRED if k not in payload]
    if missing or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (missing {', '.join(missing) or 'format'})")
    if stored is None:
        log.warning("%s has no content hash (written before cdm-ood stored one): it cannot be verified; saving it "
                    "again (e.g. `cdm-ood calibrate`) adds one", path)  # fmt: skip
    return {**payload, DIGEST: digest}


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


@dataclass(frozen=True)
class TrainingState:
    """Where a training run stands: the entries of a full checkpoint (`checkpoints/step_*.pt`) that resuming
    restores, typed. `step` is the number of optimizer steps done; `model`, `ema`, `optimizer` and `scheduler`
    are state dicts; `generator` is the state of the generator of every step's draws, so a resumed run continues
    exactly; `run_id` is the MLflow run the training logged to (continued on resume), which the tracking callback
    writes into each checkpoint (`RUN_ID`), so it is not among `entries`."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    run_id: Optional[str] = None

    def entries(self) -> dict[str, Any]:
        """The checkpoint entries that hold this state (`from_checkpoint` reads them back)."""
        return {"step": self.step, "model": self.model, "ema": self.ema, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "rng": {"generator": self.generator}}  # fmt: skip

    @classmethod
    def from_checkpoint(cls, path: str | Path, payload: Mapping[str, Any]) -> TrainingState:
        """The state in a loaded full checkpoint; `CheckpointError` for one that holds only the model (`model.pt`)."""
        missing = [k for k in ("model", "optimizer", "scheduler", "rng") if k not in payload]
        if missing:
            raise CheckpointError(f"{path}: not a full training checkpoint (no {', '.join(missing)}): resume from a "
                                  "run folder or one of its checkpoints/step_*.pt")  # fmt: skip
        return cls(payload["step"], payload["model"], payload["ema"], payload["optimizer"], payload["scheduler"],
                   payload["rng"]["generator"], training_run_id(path, payload))  # fmt: skip


def ema_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA weights (the model used for scoring) as a plain `CDMClassifier` state dict."""
    return {k.removeprefix("module."): v for k, v in payload["ema"].items() if k.startswith("module.")}


@dataclass
class LoadedModel:
    """Everything scoring needs from a checkpoint: the EMA classifier (eval mode), its spec and schedule, its
    OOD calibration (None until calibrated), the MLflow run that trained it (None when not tracked) and the
    checkpoint's `content_digest` (verified on load: the identity of exactly these weights, spec and calibration)."""

    classifier: CDMClassifier
    schedule: NoiseSchedule
    spec: ModelSpec
    config: dict[str, Any]
    step: int
    digest: str
    calibration: Optional[Calibration] = None
    training_run_id: Optional[str] = None

    @property
    def device(self) -> torch.device:
        """Where the classifier's weights are (`load_model(path, device)`)."""
        return next(self.classifier.parameters()).device


def check_spec(path: str | Path, payload: dict[str, Any]) -> ModelSpec:
    """The stored model spec, validated (types, structure, sane bounds) before anything is built: a crafted spec
    cannot make loading allocate gigabytes."""
    from .sections import ConfigError

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


def check_calibration(path: str | Path, payload: dict[str, Any]) -> Optional[Calibration]:
    """The stored calibration (None when there is none), checked to be one that calibration writes
    (`Calibration.check`: finite numbers, a rate in (0, 1), consistent counts and names)."""
    stored = payload.get("calibration")
    if not stored:
        return None
    try:
        calibration = Calibration.from_dict(stored)
        calibration.check()
        return calibration
    except KeyError as err:
        raise CheckpointError(f"{path}: implausible calibration, refused (missing {err})") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: implausible calibration, refused ({err})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The scoring model of a checkpoint (EMA weights), on `device`, in eval mode; the spec is validated before
    the network is built, the weights are checked to be finite and the calibration to be plausible."""
    payload = load_checkpoint(path)
    spec = check_spec(path, payload)
    state = ema_state(payload)
    check_weights(path, state)
    classifier = spec.build_classifier()
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored model spec ({err})") from None
    return LoadedModel(
        classifier=classifier.to(device).eval(),
        schedule=spec.noise_schedule(),
        spec=spec,
        config=payload["config"],
        step=payload["step"],
        digest=payload[DIGEST],
        calibration=check_calibration(path, payload),
        training_run_id=training_run_id(path, payload),
    )
