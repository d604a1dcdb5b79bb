"""`ModelSpec`: what a trained network is and what it takes, stored in its checkpoint and read back typed.

The spec is the architecture (`ModelConfig`), the noise schedule (`ScheduleConfig`), and the input: intensity
preset, size, channels and bit depth. Everything that builds, feeds or scores a model reads it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.transforms import Compose

from ..data.presets import IntensityPreset
from ..data.transforms import image_transform
from ..diffusion.classifier import CDMClassifier
from ..diffusion.schedules import NoiseSchedule
from ..utils.precision import PRECISIONS
from .sections import ModelConfig, ScheduleConfig, parse_section, validate_model


@dataclass(frozen=True)
class ModelSpec:
    """The network (`model`), its noise schedule and its input (preset, `size`, `channels`, `bit_depth`)."""

    model: ModelConfig
    schedule: ScheduleConfig
    preset: IntensityPreset
    size: tuple[int, ...]
    channels: int
    bit_depth: int

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    @property
    def unit(self) -> str:
        """What the model scores as one image: a `volume` (3D model) or a `slice` (2D model)."""
        return "volume" if self.spatial_dims == 3 else "slice"

    @property
    def num_dims(self) -> int:
        """d, the number of input values per image (channels x pixels or voxels)."""
        return self.channels * math.prod(self.size)

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.schedule)

    def build_classifier(self) -> CDMClassifier:
        """The untrained `CDMClassifier` this spec describes."""
        m = self.model
        return CDMClassifier(
            spatial_dims=self.spatial_dims,
            in_channels=self.channels,
            T=self.schedule.T,
            channels=tuple(m.channels),
            attention_levels=tuple(m.attention_levels),
            num_res_blocks=m.num_res_blocks,
            num_classes=m.num_classes,
            norm_num_groups=m.norm_num_groups,
            num_head_channels=m.num_head_channels,
            arch=m.arch,
        )

    def input_transform(self) -> Compose:
        """Images in their own units -> model input: the stored preset and size, exactly as in training."""
        return image_transform(self.preset, self.size, self.channels, multiple=1)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a `weights_only` checkpoint and MLflow)."""
        return {
            "model": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.model).items()},
            "schedule": dict(vars(self.schedule)),
            "preset": self.preset.to_dict(),
            "size": list(self.size),
            "channels": self.channels,
            "bit_depth": self.bit_depth,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The typed spec, checked like a config (types, structure, sane bounds); raises `ConfigError`."""
        spec = cls(
            model=parse_section(ModelConfig, d["model"], "model"),
            schedule=parse_section(ScheduleConfig, d["schedule"], "schedule"),
            preset=IntensityPreset.from_dict(d["preset"]),
            size=tuple(int(s) for s in d["size"]),
            channels=int(d["channels"]),
            bit_depth=int(d["bit_depth"]),
        )
        validate_model(spec.model, spec.schedule, spec.size, spec.channels)
        return spec


@dataclass(frozen=True, eq=False)
class DetectorFit:
    """One fitted OOD detector: its state (`Detector.state`: plain data and tensors) and its scores on held-out
    in-distribution images."""

    state: dict[str, Any]
    id_scores: tuple[float, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DetectorFit) and self.id_scores == other.id_scores and _same(self.state, other.state)


def _same(a: Any, b: Any) -> bool:
    """Equality of nested plain data holding tensors (compared with `torch.equal`)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@dataclass(frozen=True)
class VolumeCheckFit:
    """A volume check (`cdm_ood.ood.volume_checks`) fitted on in-distribution volumes: its parameters and the
    statistic of each held-out in-distribution volume."""

    params: dict[str, tuple[float, ...]]
    id_scores: tuple[float, ...]


@dataclass(frozen=True)
class Calibration:
    """The OOD calibration of a model: every detector's fit, the default detector, and the false-positive rate
    that the threshold `auto` means (any other rate `fpr:<x>` follows from the stored scores), the network
    precision the features were computed in (`precision.PRECISIONS`), which scoring uses by default, and the volume
    checks by name (none when the calibration slices came without enough whole volumes, or from a 3D model)."""

    fpr: float
    default: str
    n_fit: int
    detectors: dict[str, DetectorFit]
    precision: str = "float32"
    volume_checks: dict[str, VolumeCheckFit] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a `weights_only` checkpoint)."""
        fits = {k: {"state": v.state, "id_scores": list(v.id_scores)} for k, v in self.detectors.items()}
        checks = {k: {"params": {p: list(v) for p, v in c.params.items()}, "id_scores": list(c.id_scores)}
                  for k, c in self.volume_checks.items()}  # fmt: skip
        return {"fpr": self.fpr, "default": self.default, "n_fit": self.n_fit, "detectors": fits,
                "precision": self.precision, "volume_checks": checks}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        fits = {
            k: DetectorFit(dict(v["state"]), tuple(float(s) for s in v["id_scores"])) for k, v in d["detectors"].items()
        }
        checks = dict(d.get("volume_checks", {}))
        if d.get("slice_order"):  # written before the volume checks had names: the slice-order check only
            checks["slice-order"] = {"params": {"template": d["slice_order"]["template"]},
                                     "id_scores": d["slice_order"]["id_scores"]}  # fmt: skip
        checks = {k: VolumeCheckFit({p: tuple(float(x) for x in v) for p, v in c["params"].items()},
                                    tuple(float(x) for x in c["id_scores"])) for k, c in checks.items()}  # fmt: skip
        return cls(float(d["fpr"]), str(d["default"]), int(d["n_fit"]), fits, str(d.get("precision", "float32")),
                   checks)  # fmt: skip

    def check(self) -> None:
        """Raise `ValueError` naming the first field that calibration (`cdm_ood.ood.calibration.calibrate`) cannot
        have written: a NaN or infinite number, a false-positive rate outside (0, 1), no fitted image, an empty or
        mismatched set of held-out scores, a detector stored under another detector's name, an unknown default or
        precision. Thresholds are order statistics of the held-out scores, so these checks cover them too."""
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"calibration.fpr is {self.fpr}, not a false-positive rate in (0, 1)")
        if self.n_fit < 1:
            raise ValueError(f"calibration.n_fit is {self.n_fit}: no image was fitted")
        if self.default not in self.detectors:
            raise ValueError(f"calibration.default {self.default!r} is not among the calibrated detectors")
        if self.precision not in PRECISIONS:
            raise ValueError(f"calibration.precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        held_out = len(self.detectors[self.default].id_scores)
        if held_out == 0:
            raise ValueError(f"calibration.detectors.{self.default}.id_scores is empty")
        for name, fit in self.detectors.items():
            where = f"calibration.detectors.{name}"
            if fit.state.get("name") != name:
                raise ValueError(f"{where}.state.name is {fit.state.get('name')!r}, not {name!r}")
            if len(fit.id_scores) != held_out:
                raise ValueError(f"{where}.id_scores holds {len(fit.id_scores)} scores, {self.default}'s {held_out}: "
                                 "every detector scores the same held-out images")  # fmt: skip
            _check_finite(f"{where}.state", fit.state)
            _check_finite(f"{where}.id_scores", fit.id_scores)
        for name, check in self.volume_checks.items():
            where = f"calibration.volume_checks.{name}"
            if not check.id_scores:
                raise ValueError(f"{where}.id_scores is empty")
            _check_finite(f"{where}.params", check.params)
            _check_finite(f"{where}.id_scores", check.id_scores)


def _check_finite(where: str, value: Any) -> None:
    """Raise `ValueError` naming the first NaN or infinite number in `value` (nested plain data and tensors)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} holds NaN or infinite values")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(f"{where}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}")
