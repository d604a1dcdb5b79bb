"""The model's own configuration sections, and how any section is parsed: `ModelConfig` (the network) and
`ScheduleConfig` (the noise schedule), which every checkpoint stores in its `ModelSpec`; `validate_model`, the checks
every model passes (a run config's or a stored one); `parse_section`, a config dataclass from plain data with every
key and type checked; `ConfigError`, naming the offending key. A run's whole configuration is
`cdm_ood.jobs.config.Config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..diffusion.classifier import ARCHS
from ..diffusion.schedules import KINDS
from ..errors import CdmOodError


class ConfigError(CdmOodError, ValueError):
    """A configuration that cannot run, with the offending key in the message."""


@dataclass
class ModelConfig:
    """`CDMClassifier` arguments (MONAI DiffusionModelUNet backbone, `arch` `unet` or `encoder`: its down path and
    middle block only); `num_classes` makes it class-conditional."""

    channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: int = 16
    num_classes: Optional[int] = None
    arch: str = "unet"


@dataclass
class ScheduleConfig:
    """`NoiseSchedule`: `linear` (beta_start, beta_end), `uniform` or `cosine`, with T noise levels.

    The default is CDM(unif.), the schedule with the better likelihoods (`benchmarks/ablations.py`, docs/evidence.md
    sections 2 and 6); the paper's linear schedule gives better samples.
    """

    kind: str = "uniform"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` checked and converted to the annotated type `hint` (int, float, bool, str, tuples, Optional,
    nested dataclasses)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return parse_section(hint, value, key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {key}")


def parse_section(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """The config dataclass `cls` from plain data, every key and type checked (`ConfigError` names the key)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


LIMITS = {"channels": 4096, "levels": 8, "num_res_blocks": 16, "T": 100_000, "num_classes": 100_000,
          "input_voxels": 2**26}  # fmt: skip


def validate_model(model: ModelConfig, schedule: ScheduleConfig, size: Sequence[int], channels: int) -> None:
    """The checks of a network and its input that every model spec must pass (a run config's, or one stored in a
    checkpoint): the sane bounds of `LIMITS`, then the UNet's structural constraints."""
    _within_limits(model, schedule, size, channels)
    m = model
    for key, value, allowed in (("schedule.kind", schedule.kind, KINDS), ("model.arch", m.arch, ARCHS)):
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if len(size) not in (2, 3):
        raise ConfigError(f"data.size: {list(size)} must have 2 values (slices) or 3 (volumes)")
    multiple = 2 ** (len(m.channels) - 1)
    if any(s % multiple for s in size):
        raise ConfigError(f"data.size: {list(size)} must be multiples of {multiple} for {len(m.channels)} UNet levels")
    if len(m.attention_levels) != len(m.channels):
        raise ConfigError("model.attention_levels: needs one entry per model.channels level")
    if any(c % m.norm_num_groups for c in m.channels):
        raise ConfigError(f"model.channels: each must be a multiple of model.norm_num_groups={m.norm_num_groups}")
    attended = [c for c, a in zip(m.channels, m.attention_levels, strict=False) if a] + [m.channels[-1]]
    if any(c % m.num_head_channels for c in attended):
        raise ConfigError(
            f"model.num_head_channels: {m.num_head_channels} must divide the channels of every attention level and "
            f"of the last level (the UNet's middle block attends there): {attended}"
        )
    if channels not in (1, 3):
        raise ConfigError("data.channels: 1 or 3")


def _within_limits(m: ModelConfig, schedule: ScheduleConfig, size: Sequence[int], channels: int) -> None:
    channels_ok = len(m.channels) <= LIMITS["levels"] and all(1 <= c <= LIMITS["channels"] for c in m.channels)
    checks = {
        "model.channels": (channels_ok, f"at most {LIMITS['levels']} levels of 1..{LIMITS['channels']} channels"),
        "model.num_res_blocks": (1 <= m.num_res_blocks <= LIMITS["num_res_blocks"], f"1..{LIMITS['num_res_blocks']}"),
        "model.num_classes": (m.num_classes is None or 1 <= m.num_classes <= LIMITS["num_classes"],
                              f"1..{LIMITS['num_classes']}"),
        "schedule.T": (1 <= schedule.T <= LIMITS["T"], f"1..{LIMITS['T']:,}"),
        "data.size": (all(s >= 1 for s in size) and math.prod(size) * channels <= LIMITS["input_voxels"],
                      f"at most {LIMITS['input_voxels']:,} input values per image"),
    }  # fmt: skip
    for key, (ok, bound) in checks.items():
        if not ok:
            raise ConfigError(f"{key}: outside the sane bounds ({bound})")
