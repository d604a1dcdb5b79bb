from pathlib import Path

import pytest

from cdm_ood.jobs.config import Config, ConfigError, flatten, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
NEEDS_ROOT = {"cifar10", "cifar10-uniform", "celeba64"}


def test_the_default_config_is_the_bundled_mnist_cpu_file():
    assert load_config(Path(__file__).parent.parent / "configs" / "mnist-cpu.yaml") == load_config() == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bundled_config_is_valid(path):
    overrides = ["data.root=/data/somewhere"] if path.stem in NEEDS_ROOT else []
    config = load_config(path, overrides)
    assert config.name == path.stem
    assert load_config(base=config.to_dict()) == config, "a stored config reloads to itself"


def test_paper_settings_in_the_gpu_configs():
    c = load_config(Path(__file__).parent.parent / "configs" / "cifar10.yaml", ["data.root=/x"])
    assert (c.optim.lr, c.train.batch_size, c.optim.warmup_steps, c.optim.decay_every, c.optim.decay_factor) == (
        2e-4, 128, 5000, 200_000, 0.1
    )  # fmt: skip
    assert (c.optim.ema_decay, c.loss.ce_weight, c.schedule.T, c.schedule.kind) == (0.9999, 1e-3, 1000, "linear")
    u = load_config(Path(__file__).parent.parent / "configs" / "cifar10-uniform.yaml", ["data.root=/x"])
    assert u.schedule.kind == "uniform" and flatten(u) | {"name": "cifar10", "schedule.kind": "linear"} == flatten(c)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "unknown key 'train.stepz' (did you mean 'steps'?)"),
        (["optimiser.lr=1"], "unknown key 'optimiser' (did you mean 'optim'?)"),
        (["train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["train.steps=true"], "train.steps: expected an integer"),
        (["data.size=[28]"], "data.size: [28] must have 3 values with data.volumes, else 2"),
        (["data.size=[30, 30]"], "multiples of 4"),
        (["data.preset=zscore"], "data.preset: 'zscore' is not one of"),
        (["schedule.kind=sigmoid"], "schedule.kind"),
        (["model.attention_levels=[true]"], "one entry per model.channels level"),
        (["data.dataset=cifar10"], "data.root"),
        (["loss.label_dropout=1.5"], "label_dropout"),
        (["optim.betas=[0.9]"], "optim.betas: expected 2 values, got 1"),
        (["train.steps"], "--set expects key=value"),
        (["model.num_head_channels=64"], "must divide the channels of every attention level"),
    ],
)
def test_invalid_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.batch_sise' \(did you mean 'batch_size'\?\)"):
        load_config(bad)


def test_overrides_are_typed_and_nested():
    c = load_config(overrides=["train.steps=7", "optim.lr=3e-4", "data.phantoms={n: 2}", "model.num_classes=10"])
    assert c.train.steps == 7 and c.optim.lr == 3e-4 and c.data.phantoms.n == 2 and c.model.num_classes == 10
    assert flatten(c)["data.size"] == [28, 28]
