"""OOD scoring end to end: a real (tiny) trained checkpoint, real DICOM/NIfTI/PNG files, the real CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import PATIENT
from monai.transforms import Compose, Lambdad

from cdm_ood import OODDetector, ScoreOODd
from cdm_ood.checkpoint import load_checkpoint
from cdm_ood.cli import main
from cdm_ood.data import iter_slices


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def cdm(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`cdm-ood ...` as a real process (fresh interpreter, its own working directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "cdm_ood.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env)  # fmt: skip


def invoke(*args) -> Result:
    """The same command in-process (click's runner): seconds faster where a fresh process proves nothing."""
    return CliRunner().invoke(main, [str(a) for a in args])


def test_training_leaves_a_calibrated_checkpoint(checkpoint):
    ood = load_checkpoint(checkpoint)["ood"]
    assert set(ood["detectors"]) == {"nll", "multiscale"} and ood["fpr"] == 0.05
    detector = OODDetector.from_checkpoint(checkpoint)
    assert detector.name == "nll" and np.isfinite(detector.threshold)


def test_score_reports_every_file_and_exits_1_and_leaves_inputs_alone(checkpoint, scans, tmp_path):
    before = digest(scans)
    out = cdm("score", scans, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--workers", 2,
              "--mlflow", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert digest(scans) == before, "inputs unchanged"
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["rows"]
    files = {r["path"] for r in rows if r["level"] in ("slice", "file")}
    expected = {str(p) for p in scans.rglob("*") if p.is_file()}
    assert files == expected, "every input file appears in the report"
    by_path = {r["path"]: r for r in rows if r["level"] == "file"}
    assert by_path[str(scans / "broken.dcm")]["verdict"] == "unreadable"
    assert by_path[str(scans / "broken.dcm")]["reason"].startswith("UnreadableFileError: ")
    assert by_path[str(scans / "notes.txt")]["reason"].startswith("NotAnImageError")
    blank = [r for r in rows if r["path"] == str(scans / "blank.png")]
    assert {r["verdict"] for r in blank} == {"flagged"} and "constant" in blank[0]["reason"]
    slices = [r for r in rows if r["level"] == "slice" and r["verdict"] in ("in", "ood")]
    assert len(slices) == 12 and all(r["sop_instance_uid"] for r in slices if r["path"].endswith(".dcm"))
    volumes = {r["volume"]: r for r in rows if r["level"] == "volume"}
    assert len(volumes) == 4 and volumes[str(scans / "blank.png")]["verdict"] == "flagged"
    for volume, row in volumes.items():
        members = [r["score"] for r in slices if r["volume"] == volume]
        if members:
            assert row["score"] == pytest.approx(np.mean(members))
            assert row["verdict"] == ("ood" if row["score"] > row["threshold"] else "in")
    assert report["summary"]["passed"] is False
    outputs = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "r_hist.png").exists() and any(p.name == "mlflow.db" for p in outputs)
    for text in [out.stdout, out.stderr, *(p.read_bytes().decode("latin-1") for p in outputs)]:
        for value in PATIENT.values():
            assert value not in text, "no patient identifier in any output"


def test_threshold_modes_and_no_fail(checkpoint, scans, tmp_path):
    nifti = scans / "clean.nii.gz"
    ok = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "a.csv")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[-1])["passed"] is True
    low = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "-1e12", "--out", tmp_path / "b.csv")
    assert low.exit_code == 1
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0].startswith("level,path,slice") and all(",ood," in line for line in lines[1:])
    assert invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "-1e12", "--no-fail", "--out",
                  tmp_path / "c.csv").exit_code == 0  # fmt: skip
    thresholds = []
    for spec in ("auto", "fpr:0.5"):
        r = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", spec, "--detector", "nll", "--out",
                   tmp_path / "d.json", "--no-fail")  # fmt: skip
        assert r.exit_code == 0, r.output
        thresholds.append(json.loads((tmp_path / "d.json").read_text())["threshold"])
    assert thresholds[1] < thresholds[0]
    bad = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "high")
    assert bad.exit_code == 2 and "'auto', 'fpr:<x>' or a number" in bad.stderr


def test_per_volume_mean_and_q95(checkpoint, scans, tmp_path):
    scores = {}
    for how in ("max", "mean", "q95"):
        invoke("score", scans / "spiked.nii.gz", "--checkpoint", checkpoint, "--per-volume", how, "--out",
               tmp_path / f"{how}.json", "--no-fail")  # fmt: skip
        rows = json.loads((tmp_path / f"{how}.json").read_text())["rows"]
        slices = np.array([r["score"] for r in rows if r["level"] == "slice"])
        (volume,) = [r["score"] for r in rows if r["level"] == "volume"]
        scores[how] = volume
        expected = {"max": slices.max(), "mean": slices.mean(), "q95": np.quantile(slices, 0.95)}[how]
        assert volume == pytest.approx(expected)
    assert scores["mean"] <= scores["q95"] <= scores["max"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_needs_pickle_code_is_refused_and_runs_nothing(scans, tmp_path):
    torch.save({"format": "x", "evil": Payload()}, tmp_path / "evil.pt")
    out = cdm("score", scans / "clean.nii.gz", "--checkpoint", tmp_path / "evil.pt", cwd=tmp_path)
    assert out.returncode == 2 and "refused" in out.stderr
    assert not (tmp_path / "pwned").exists()


def test_calibrate_command_rewrites_only_the_calibration(checkpoint, scans, tmp_path):
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    out = invoke("calibrate", "--checkpoint", copy, "--data", scans / "study", "--data", scans / "clean.nii.gz",
                 "--fpr", "0.1")  # fmt: skip
    assert out.exit_code == 0, out.output
    old, new = load_checkpoint(checkpoint), load_checkpoint(copy)
    assert new["ood"]["fpr"] == 0.1 and new["ood"]["n_fit"] == 4 and new["ood"] != old["ood"]
    assert all(torch.equal(old["ema"][k], new["ema"][k]) for k in old["ema"])


def test_python_api_on_tensors_arrays_paths_and_monai_dicts(checkpoint, scans):
    detector = OODDetector.from_checkpoint(checkpoint, detector="nll")
    path = scans / "clean.nii.gz"
    images = [s.image for s in iter_slices(path)]
    from_path = detector.score(path)
    np.testing.assert_allclose(detector.score(np.stack(images)), from_path, rtol=1e-5)
    np.testing.assert_allclose(detector.score(torch.from_numpy(images[0][0])), from_path[:1], rtol=1e-5)
    np.testing.assert_allclose(detector.score([{"image": im} for im in images]), from_path, rtol=1e-5)
    assert detector.predict(path).dtype == bool and len(detector.predict(path)) == 4
    chain = Compose([Lambdad("image", lambda im: im * 1.0), ScoreOODd("image", detector)])
    out = chain({"image": images[1], "id": "x"})
    assert out["image_ood_score"] == pytest.approx(from_path[1], rel=1e-5)
    assert out["image_ood"] == (from_path[1] > detector.threshold) and out["id"] == "x"


def test_evaluate_writes_metrics_and_figures(checkpoint, scans, tmp_path):
    out = invoke("evaluate", "--checkpoint", checkpoint, "--id", scans / "clean.nii.gz", "--ood",
                 f"spike={scans / 'spiked.nii.gz'}", "--out", tmp_path / "eval")  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {(r["detector"], r["ood_set"]) for r in rows} == {("nll", "spike"), ("multiscale", "spike")}
    assert all(0 <= r["auroc"] <= 1 and r["n_id"] == r["n_ood"] == 4 for r in rows)
    assert all((tmp_path / "eval" / f"{k}_{d}.png").stat().st_size > 1000 for k in ("roc", "hist")
               for d in ("nll", "multiscale"))  # fmt: skip
    assert "auroc" in out.stdout and "spike" in out.stdout
