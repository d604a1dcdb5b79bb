"""Run configuration: one typed schema (dataclasses), parsed and validated once from YAML plus `--set` overrides.

Every YAML key must name a field; a misspelt key, a wrong type or an impossible value is a `ConfigError` that
names the key before any work starts. The resolved config is plain data (`to_dict`), stored in checkpoints and
logged to MLflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

import yaml

from ..configs import bundled_names
from ..data.artifacts import MODALITIES
from ..data.natural import NATURAL_DATASETS
from ..data.phantom_sets import ANATOMIES, FORMATS
from ..data.presets import PRESETS, IntensityPreset
from ..diffusion.classifier import ARCHS
from ..diffusion.schedules import KINDS
from ..model.sections import ConfigError, ModelConfig, ScheduleConfig, parse_section, validate_model
from ..model.spec import ModelSpec
from ..utils.precision import PRECISIONS


@dataclass
class PhantomData:
    """Phantoms generated into `data.root` when that folder does not exist yet (`cdm-ood make-phantoms`):
    `anatomy` "body" (CT or MR ellipse phantoms) or "brain" (MR subjects of the MNI152 template, NIfTI)."""

    anatomy: str = "body"
    n: int = 24
    size: int = 64
    slices: int = 16
    modality: str = "ct"
    format: str = "nifti"
    seed: int = 0


@dataclass
class DataConfig:
    """What to train on and how it is mapped to the model's input.

    `dataset` is a natural-image name (`mnist`, `digits`, `mnist-idx`, `fashion-mnist`, `cifar10`,
    `image-folder`) or `folder` (DICOM/NIfTI under `root`, split by volume). `volumes` trains on whole 3D
    volumes instead of slices. `preset` is `uint8`, `ct` (with `window`), `mr` (fitted on the training split) or
    `minmax`. `bit_depth` sets the bits/dim offset reported at validation.
    """

    dataset: str = "mnist"
    root: Optional[str] = None
    volumes: bool = False
    preset: str = "uint8"
    window: tuple[float, float] = (-1000.0, 1000.0)
    size: tuple[int, ...] = (28, 28)
    channels: int = 1
    bit_depth: int = 8
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    num_workers: int = 0
    phantoms: Optional[PhantomData] = None


@dataclass
class LossConfig:
    """Algorithm 1 weights, and the label drop rate to the null class for classifier-free guidance."""

    ce_weight: float = 1e-3
    mse_weight: float = 1.0
    label_dropout: float = 0.1


@dataclass
class OptimConfig:
    """Adam, linear warm-up, then the learning rate times `decay_factor` every `decay_every` steps; EMA.

    The defaults suit the short CPU runs of the default config; the paper's GPU settings (lr 2e-4, 5k warm-up,
    EMA 0.9999) are in configs/cifar10.yaml.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_every: int = 200_000
    decay_factor: float = 0.1
    grad_clip: Optional[float] = None
    ema_decay: float = 0.995


@dataclass
class TrainConfig:
    """Loop settings. `batch_size` is per process: the global batch is batch_size x world size. `precision` "bf16"
    runs the backbone of each training step (forward, input gradient, double backward) under bfloat16 autocast;
    the head, the logits and validation stay float32."""

    steps: int = 1000
    batch_size: int = 32
    flip_prob: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "float32"
    threads: Optional[int] = None
    log_every: int = 50
    val_every: int = 400
    val_samples: int = 500
    checkpoint_every: int = 400
    keep_last: int = 3


@dataclass
class TrackingConfig:
    """MLflow: `uri` None means $MLFLOW_TRACKING_URI, else a local SQLite store `sqlite:///mlflow.db`."""

    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "cdm-ood"
    run_name: Optional[str] = None


@dataclass
class GateConfig:
    """How the QA gate decides with this model: `report_only` names volume checks (`cdm_ood.ood.volume_checks.CHECKS`)
    whose findings are reported (in the volume's reason) without stopping the gate, e.g. `local` in front of a
    diagnostic model that must see disease (docs/ood.md, "Local anomalies")."""

    report_only: tuple[str, ...] = ()


@dataclass
class Config:
    name: str = "mnist-cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(_plain(self.to_dict()), Dumper=_Dumper, sort_keys=False)

    def model_spec(self, preset: IntensityPreset) -> ModelSpec:
        """The spec of the model this run trains, with the preset fitted on its training data."""
        d = self.data
        return ModelSpec(self.model, self.schedule, preset, tuple(d.size), d.channels, d.bit_depth)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (`size: [28, 28]`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))

CHOICES = {  # allowed values, from the registries that implement them
    "data.dataset": (*NATURAL_DATASETS, "folder"),
    "data.preset": PRESETS,
    "data.phantoms.modality": MODALITIES,
    "data.phantoms.format": FORMATS,
    "data.phantoms.anatomy": ANATOMIES,
    "schedule.kind": KINDS,
    "model.arch": ARCHS,
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": PRECISIONS,
}


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, for YAML and MLflow."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings as (key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"--set {key.strip()}: the value is not plain YAML ({problem})") from None
        pairs.append((key.strip(), value))
    return pairs


def bundled_config(name_or_path: str) -> Path:
    """A config path as given, or the bundled `configs/<name>.yaml` when no such file exists; a name that is
    neither is a `ConfigError` listing the bundled names."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    bundled = Path(str(files("cdm_ood.configs") / f"{name_or_path}.yaml"))
    if not bundled.exists():
        raise ConfigError(f"--config {name_or_path}: no such file and no bundled config of that name (bundled: "
                          f"{', '.join(bundled_names())})")  # fmt: skip
    return bundled


def load_config(path: Optional[str | Path] = None, overrides: list[str] = (), base: Optional[dict] = None) -> Config:
    """The validated config from a YAML file (or `base`, a stored config dict, or the defaults) plus overrides."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the config ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a YAML mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    config = parse_section(Config, tree)
    validate(config)
    return config


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def flatten(config: Config) -> dict[str, Any]:
    """Dotted key -> value (lists kept), e.g. for MLflow params."""
    return _flatten(_plain(config.to_dict()))


# Sane bounds of a model spec: far above any real model, far below what would exhaust a machine. A config (or a
# crafted checkpoint) beyond them is refused before anything is allocated.
def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express, and the sane bounds of `LIMITS`."""
    flat = flatten(config)
    for key, allowed in CHOICES.items():
        if key in flat and flat[key] is not None and flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    from ..ood.volume_checks import CHECKS

    unknown = sorted(set(config.gate.report_only) - set(CHECKS))
    if unknown:
        raise ConfigError(f"gate.report_only: {', '.join(unknown)} not among the volume checks {', '.join(CHECKS)}")
    d, t = config.data, config.train
    dims = len(d.size)
    if (d.volumes and dims != 3) or (not d.volumes and dims != 2):
        raise ConfigError(f"data.size: {list(d.size)} must have 3 values with data.volumes, else 2")
    validate_model(config.model, config.schedule, d.size, d.channels)
    if d.dataset in ("mnist-idx", "fashion-mnist", "cifar10", "image-folder") and d.root is None:
        raise ConfigError(f"data.root: dataset {d.dataset!r} reads files; give their folder")
    if d.dataset == "folder" and d.root is None:
        raise ConfigError("data.root: dataset 'folder' needs the folder of DICOM/NIfTI scans")
    brain = d.phantoms is not None and d.phantoms.anatomy == "brain"
    if brain and (d.phantoms.modality, d.phantoms.format) != ("mr", "nifti"):
        raise ConfigError("data.phantoms: brain subjects need modality 'mr' and format 'nifti'")
    if d.volumes and d.dataset != "folder":
        raise ConfigError("data.volumes: 3D volumes come from dataset 'folder'")
    if t.steps < 1 or t.batch_size < 1:
        raise ConfigError("train.steps and train.batch_size must be positive")
    for key in ("log_every", "val_every", "checkpoint_every", "keep_last"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1")
    if not 0.0 <= config.loss.label_dropout < 1.0 or not 0.0 <= t.flip_prob <= 1.0:
        raise ConfigError("loss.label_dropout must be in [0, 1) and train.flip_prob in [0, 1]")
    if not 0.0 < config.optim.ema_decay < 1.0:
        raise ConfigError("optim.ema_decay: must be in (0, 1)")
    if config.loss.ce_weight < 0 or config.loss.mse_weight < 0 or config.loss.ce_weight + config.loss.mse_weight == 0:
        raise ConfigError("loss.ce_weight and loss.mse_weight: non-negative, not both 0")
