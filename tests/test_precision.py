"""bf16 scoring (`cdm_ood.utils.precision`): the backbone under bfloat16 autocast moves every score by a small
fraction of its in-distribution spread; the calibration records its precision and scoring follows it."""

import logging

import pytest
import torch
from click.testing import CliRunner

from cdm_ood import OODDetector
from cdm_ood.cli import main
from cdm_ood.diffusion.likelihood import bits_per_dim
from cdm_ood.errors import UsageError
from cdm_ood.model.checkpoint import load_checkpoint
from cdm_ood.utils.precision import PRECISIONS


def test_bf16_runs_the_backbone_in_bfloat16_and_its_features_match_float32(checkpoint, scans):
    x = OODDetector.from_checkpoint(checkpoint).prepare(scans / "clean.nii.gz")
    needs, dims = ("profile", "flips", "residuals"), x[0].numel()
    features, dtypes = {}, {}
    for precision in PRECISIONS:
        detector = OODDetector.from_checkpoint(checkpoint, precision=precision)
        conv = next(m for m in detector.model.classifier.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda module, args, out, p=precision: dtypes.update({p: out.dtype}))
        features[precision] = detector.features(x, needs)
        hook.remove()
    assert dtypes == {"float32": torch.float32, "bf16": torch.bfloat16}
    a, b = features["float32"], features["bf16"]
    assert all(v.dtype == torch.float32 for v in b.values())  # the head and every statistic stay float32
    for name in ("profile", "flips"):  # log p_t(x) and log p_0(flip x), bits/dim
        assert (bits_per_dim(b[name], dims) - bits_per_dim(a[name], dims)).abs().max() < 0.02, name
    mse = {p: f["residuals"].square().mean(dim=(2, 3, 4)) for p, f in features.items()}  # per image and level
    ratio = mse["bf16"] / mse["float32"]
    assert (ratio - 1).abs().max() < 0.02


def test_the_calibration_records_its_precision_and_scoring_follows_it(checkpoint, scans, tmp_path, caplog):
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    out = CliRunner().invoke(main, ["calibrate", str(scans / "study"), str(scans / "clean.nii.gz"), "--checkpoint",
                                    str(copy), "--fpr", "0.1", "--precision", "bf16"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert load_checkpoint(copy)["calibration"]["precision"] == "bf16"
    assert load_checkpoint(checkpoint)["calibration"]["precision"] == "float32"
    assert OODDetector.from_checkpoint(copy).precision == "bf16"
    report = tmp_path / "report.csv"
    out = CliRunner().invoke(main, ["score", str(scans / "clean.nii.gz"), "--checkpoint", str(copy), "--out",
                                    str(report), "--no-fail"])  # fmt: skip
    assert out.exit_code == 0 and report.exists(), out.output
    with caplog.at_level(logging.WARNING, "cdm_ood.api"):
        assert OODDetector.from_checkpoint(copy, precision="float32").precision == "float32"
    assert "calibrate with --precision float32" in caplog.text
    with pytest.raises(UsageError, match="precision must be one of float32, bf16"):
        OODDetector.from_checkpoint(copy, precision="fp16")
