import dataclasses
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_score import invoke

from cdm_ood.model.checkpoint import (
    DIGEST,
    CheckpointError,
    content_digest,
    load_checkpoint,
    load_model,
    save_checkpoint,
    store_calibration,
)


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
    payload.pop(DIGEST)  # written before content hashes
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


def rewrite_member(path: Path, name: str, change: Callable[[bytearray], None], fix_crc: bool) -> None:
    """Change the bytes of the zip member `name` of the checkpoint at `path` in place (same length), as bit rot
    would; with `fix_crc` the member's CRC-32 is rewritten to match (in the central directory, which readers check,
    and in the data descriptor after the member), as a rewrite of the file would."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    end = start + info.file_size
    member = raw[start:end]
    change(member)
    raw[start:end] = member
    if fix_crc:
        crc = struct.pack("<I", zlib.crc32(member))
        central = raw.rindex(name.encode()) - 46
        assert raw[central : central + 4] == b"PK\x01\x02"
        raw[central + 16 : central + 20] = crc
        if raw[end : end + 4] == b"PK\x07\x08":
            raw[end + 4 : end + 8] = crc
    path.write_bytes(bytes(raw))


def member_named(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith(suffix))


def error_lines(out) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("fix_crc, reason", [(False, r"zip member \S+/data\.pkl is damaged \(Bad CRC-32"),
                                             (True, "content hash mismatch")])  # fmt: skip
def test_two_flipped_bits_in_a_calibration_number_are_refused(checkpoint, scans, tmp_path, fix_crc, reason):
    """The sign bit and the top exponent bit of the default detector's largest held-out score (its `auto` threshold,
    4 scores held out) flipped: a threshold of 5e307 that would pass every scan, and torch loads the file without a
    word. `score` refuses it (exit 2, one error line naming the checkpoint, no report): by the zip CRC, and with the
    CRC rewritten to match, by the content hash."""
    copy = Path(shutil.copy(checkpoint, tmp_path / "model.pt"))
    default = load_checkpoint(copy)["calibration"]["default"]
    threshold = max(load_checkpoint(copy)["calibration"]["detectors"][default]["id_scores"])

    def flip(member: bytearray) -> None:
        at = bytes(member).index(b"G" + struct.pack(">d", threshold)) + 1  # pickle's BINFLOAT: 8 bytes, big-endian
        member[at] ^= 0x80 | 0x40

    rewrite_member(copy, member_named(copy, "/data.pkl"), flip, fix_crc)
    rotted = torch.load(copy, weights_only=True)["calibration"]["detectors"][default]["id_scores"]
    assert max(rotted) > 1e300, "torch itself loads the flipped number"
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", copy, "--out", tmp_path / "report.csv")
    (line,) = error_lines(out)
    assert out.exit_code == 2 and str(copy) in line and re.search(reason, line), out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "no report"


@pytest.mark.parametrize("fix_crc, reason", [(False, r"zip member \S+/data/\d+ is damaged \(Bad CRC-32"),
                                             (True, "content hash mismatch")])  # fmt: skip
def test_64_flipped_bytes_in_a_weight_tensor_are_refused(checkpoint, tmp_path, fix_crc, reason):
    """64 bytes inside the largest EMA weight tensor flipped (their lowest bit: the weights stay finite, so only
    integrity checks can notice): refused by the zip CRC, and with the CRC rewritten, by the content hash."""
    copy = Path(shutil.copy(checkpoint, tmp_path / "model.pt"))
    ema = load_checkpoint(copy)["ema"]
    key = max(ema, key=lambda k: ema[k].numel())
    weights = ema[key].numpy().tobytes()
    with zipfile.ZipFile(copy) as archive:
        name = next(n for n in archive.namelist() if "/data/" in n and archive.read(n) == weights)

    def flip(member: bytearray) -> None:
        for i in range(len(member) // 2, len(member) // 2 + 64):
            member[i] ^= 0x01

    rewrite_member(copy, name, flip, fix_crc)
    rotted = torch.load(copy, weights_only=True)["ema"][key]
    assert not torch.equal(rotted, ema[key]) and bool(torch.isfinite(rotted).all())
    with pytest.raises(CheckpointError, match=f"{re.escape(str(copy))}: refused: .*{reason}"):
        load_model(copy)
    out = invoke("train", "--resume", copy, "--no-mlflow")
    assert out.exit_code == 2 and re.search(reason, error_lines(out)[0]), out.output


def test_train_resume_refuses_an_altered_step_checkpoint(checkpoint, tmp_path):
    """Training's step checkpoints carry the content hash too: one with the last bit of a number in its stored config
    rewritten (CRC to match) stops `train --resume` (exit 2)."""
    step = Path(shutil.copy(checkpoint.parent / "checkpoints" / "step_0000040.pt", tmp_path / "step_0000040.pt"))
    payload = load_checkpoint(step)
    assert payload[DIGEST] == torch.load(step, weights_only=True)[DIGEST]

    def flip(member: bytearray) -> None:
        member[bytes(member).index(b"G" + struct.pack(">d", payload["config"]["optim"]["lr"])) + 8] ^= 0x01

    rewrite_member(step, member_named(step, "/data.pkl"), flip, fix_crc=True)
    assert torch.load(step, weights_only=True)["config"] != payload["config"]
    out = invoke("train", "--resume", step, "--no-mlflow")
    assert out.exit_code == 2 and "content hash mismatch" in error_lines(out)[0], out.output


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c["detectors"][c["default"]]["id_scores"].__setitem__(0, math.nan), r"\.id_scores\[0\] is nan"),
        (lambda c: c["detectors"]["nll"]["id_scores"].__setitem__(1, -math.inf), r"nll\.id_scores\[1\] is -inf"),
        (lambda c: c["detectors"]["map"]["state"]["std"].fill_(math.inf), "map.state.std holds NaN or infinite"),
        (lambda c: c.update(fpr=1.5), r"calibration\.fpr is 1\.5"),
        (lambda c: c["detectors"]["nll"]["id_scores"].pop(), "nll.id_scores holds 3 scores"),
        (lambda c: c["detectors"]["nll"]["state"].update(name="multiscale"), "nll.state.name is 'multiscale'"),
        (lambda c: c.update(default="classifier"), "default 'classifier' is not among the calibrated detectors"),
        (lambda c: c.update(n_fit=0), "n_fit is 0"),
        (lambda c: c.pop("n_fit"), "missing 'n_fit'"),
    ],
)  # fmt: skip
def test_an_implausible_calibration_with_a_valid_hash_is_refused(checkpoint, scans, tmp_path, change, field):
    """Calibrations that `calibrate` cannot write, stored through the library (so the content hash is valid): a NaN
    threshold (the largest held-out score), infinite numbers, a rate outside (0, 1), held-out scores that the
    detectors do not share, a detector under another's name, a default that was not calibrated, no fitted image.
    `load_model` refuses each, naming the checkpoint and the field; `score` exits 2 with one error line."""
    payload = load_checkpoint(checkpoint)
    change(payload["calibration"])
    path = save_checkpoint(tmp_path / "model.pt", payload)
    assert load_checkpoint(path)[DIGEST] == torch.load(path, weights_only=True)[DIGEST], "the hash verifies"
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: implausible calibration, refused.*{field}"):
        load_model(path)
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", path, "--out", tmp_path / "report.csv")
    (line,) = error_lines(out)
    assert out.exit_code == 2 and "implausible calibration" in line and not (tmp_path / "report.csv").exists()


def test_a_checkpoint_without_a_content_hash_loads_with_a_warning_and_a_stable_digest(checkpoint, tmp_path, caplog):
    """A checkpoint written before content hashes loads (it cannot be verified: a warning says so); its digest is
    computed the same way, so it equals that of the same content saved with a hash, is the same on every load,
    and changes when the calibration does (`store_calibration` also adds the hash)."""
    payload = load_checkpoint(checkpoint)
    assert payload[DIGEST] == torch.load(checkpoint, weights_only=True)[DIGEST] == content_digest(payload)
    legacy = tmp_path / "legacy.pt"
    torch.save({k: v for k, v in payload.items() if k != DIGEST}, legacy)
    with caplog.at_level(logging.WARNING, logger="cdm_ood.model.checkpoint"):
        first, second = load_model(legacy), load_model(legacy)
    assert caplog.text.count(f"{legacy} has no content hash") == 2 and "cannot be verified" in caplog.text
    assert first.digest == second.digest == load_model(checkpoint).digest == payload[DIGEST]
    store_calibration(legacy, dataclasses.replace(first.calibration, fpr=0.1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cdm_ood.model.checkpoint"):
        recalibrated = load_model(legacy)
    assert recalibrated.calibration.fpr == 0.1 and recalibrated.digest != first.digest and not caplog.text
    assert load_model(legacy).digest == recalibrated.digest
