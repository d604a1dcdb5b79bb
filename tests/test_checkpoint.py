import os
import subprocess
import sys

import pytest
import torch
from test_score import invoke

from cdm_ood.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint


class Payload:
    """Unpickling this runs `touch <marker>`: the attack a weights_only load must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path, marker):
    torch.save({"format": "cdm-ood/1", "step": 1, "model": Payload(marker)}, path)
    return path


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    path, marker = malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned"), tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="refused: the file needs pickle code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_cli_refuses_a_pickle_checkpoint_with_exit_code_2(tmp_path):
    path, marker = malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned"), tmp_path / "pwned"
    out = subprocess.run(
        [sys.executable, "-m", "cdm_ood.cli", "train", "--resume", str(path), "--no-mlflow"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "refused" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


@pytest.mark.parametrize(
    "content, message",
    [(b"not a zip", "not a readable checkpoint"), (None, "no such checkpoint"), ({"step": 1}, "not a cdm-ood/2")],
)
def test_unusable_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_save_is_atomic_and_round_trips(tmp_path):
    payload = {"step": 3, "config": {}, "spec": {}, "ema": {"w": torch.ones(2)}}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    back = load_checkpoint(path)
    assert back["format"] == "cdm-ood/2" and torch.equal(back["ema"]["w"], torch.ones(2))


def test_a_format_1_checkpoint_loads_as_the_same_model(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    spec = payload.pop("spec")
    former = {**payload, "format": "cdm-ood/1", "schedule": load_model(checkpoint).schedule.to_dict(),
              "preset": spec["preset"], "data": {k: spec[k] for k in ("size", "channels", "bit_depth")},
              "ood": payload.pop("calibration")}  # fmt: skip
    torch.save(former, tmp_path / "old.pt")
    old, new = load_model(tmp_path / "old.pt"), load_model(checkpoint)
    assert old.spec == new.spec and old.calibration == new.calibration and old.step == new.step
    assert all(torch.equal(a, b) for a, b in zip(old.classifier.state_dict().values(),
                                                 new.classifier.state_dict().values(), strict=True))  # fmt: skip


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda p: p["spec"]["model"].update(channels=[16384, 16384]), "model.channels"),
        (lambda p: p["spec"]["schedule"].update(T=2_000_000_000), "schedule.T"),
        (lambda p: p["spec"].update(size=[65536, 65536]), "data.size"),
        (lambda p: p["spec"]["model"].update(channels="many"), "model.channels"),
        (lambda p: p["spec"].pop("preset"), "preset"),
    ],
)  # fmt: skip
def test_a_crafted_model_spec_is_refused_before_anything_is_built(checkpoint, tmp_path, change, key):
    import resource

    payload = load_checkpoint(checkpoint)
    change(payload)
    payload.pop("format")
    path = save_checkpoint(tmp_path / "crafted.pt", payload)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=f"implausible model spec.*{key}"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000, "no large allocation (KiB)"
    out = invoke("score", tmp_path, "--checkpoint", path)
    assert out.exit_code == 2 and "implausible model spec" in out.stderr and "Traceback" not in out.stderr
