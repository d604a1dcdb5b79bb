"""The benchmark scripts run in their smallest setting. The numbers of the real settings are in the docs; here
each run is checked for a result that a wrong computation would change (a closed form, an ordering that holds
even for an untrained model, a gross corruption ranked above clean images, a table consistent with itself)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from cdm_ood.checkpoint import load_checkpoint
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.ood.detectors import DETECTORS

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script: str, *args, cwd: Path | None = None) -> str:
    """The script's output; it runs without MLflow settings (an earlier test's `mlflow.set_tracking_uri` leaves
    MLFLOW_TRACKING_URI in this process's environment), so a tracked run goes to `cwd`'s own store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                         text=True, timeout=300, cwd=cwd, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def cells(line: str) -> list[str]:
    """The cells of a markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def standard_normal_bpd(n: int) -> float:
    """Mean bits/dim of the first `n` bundled MNIST test images under N(0, I), by hand: what eq. 10 gives for a CDM
    whose logits are all about equal (untrained, or one training step in; random inits move it by < 0.02)."""
    x = np.stack([s["image"] for s in bundled_mnist("test")[:n]]).reshape(n, -1) / 127.5 - 1
    d = x.shape[1]
    return float(np.mean((0.5 * d * math.log(2 * math.pi) + 0.5 * np.square(x).sum(1)) / (d * math.log(2)) + 7))


def test_normalisation_runs_and_is_tracked(tmp_path):
    out = run("normalisation.py", "--steps", 2, "--size", 8, "--eval", 50, cwd=tmp_path)
    rows = {line[:30].strip(): [float(v) for v in line[30:].split()[:3]] for line in out.splitlines()
            if line.startswith(("iid uniform", "2-component"))}  # fmt: skip
    assert rows["iid uniform [-1, 1]"][0] == 8.0, "the exact density of U[-1, 1]: -log2(1/2) + 7 bits/dim"
    assert rows["2-component Gaussian mixture"][0] < 8.0
    for exact, cdm, diff in rows.values():  # the expected bits/dim of a model is never below the data's (Gibbs)
        assert cdm > exact and abs(diff - (cdm - exact)) <= 0.0011, rows
    assert (tmp_path / "mlflow.db").stat().st_size > 0


def test_ablations_then_denoising_run(tmp_path):
    tiny = ["--set", "model.channels=[8, 8]", "--set", "model.attention_levels=[false, false]", "--set",
            "model.num_head_channels=8", "--set", "schedule.T=20", "--set", "train.batch_size=8"]  # fmt: skip
    out = run("ablations.py", "--steps", 1, "--test-images", 10, "--sample-steps", 2, "--out", tmp_path / "runs",
              "--figures", tmp_path / "img", "--no-tracking", "--variants", "both,ce-only", *tiny,
              cwd=tmp_path)  # fmt: skip
    assert len(list((tmp_path / "img").glob("ablation-*.png"))) == 2
    bpd = {row[0]: float(row[2]) for row in map(cells, out.splitlines()) if row[0] in ("both", "ce-only")}
    assert list(bpd) == ["both", "ce-only"]
    assert all(abs(b - standard_normal_bpd(10)) < 0.05 for b in bpd.values()), (bpd, standard_normal_bpd(10))
    losses = {name: load_checkpoint(tmp_path / "runs" / name / "model.pt")["config"]["loss"] for name in bpd}
    assert (losses["ce-only"]["ce_weight"], losses["ce-only"]["mse_weight"]) == (1.0, 0.0), "the variant's overrides"
    assert min(losses["both"]["ce_weight"], losses["both"]["mse_weight"]) > 0
    out = run("denoising.py", "--cdm", tmp_path / "runs" / "both" / "model.pt", "--images", 10, "--steps", 2,
              "--no-tracking")  # fmt: skip
    rows = [
        [float(v) for v in line.split()[:4]] for line in out.splitlines() if re.match(r"\s+\d+\.\d\d\s+\d+\s", line)
    ]
    assert [ratio for ratio, *_ in rows] == [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    # x_t / alpha_t (the image plus noise of std sigma/alpha) has error ratio^2; guessing 0 for data in [-1, 1] has
    # error E[x0^2] < 1: even a barely trained denoiser beats both bounds (one with the noise's sign lost does not)
    assert all(cdm < min(ratio**2, 1.0) for ratio, _, cdm, _ in rows), rows
    assert [cdm for _, _, cdm, _ in rows] == sorted(cdm for _, _, cdm, _ in rows), "more noise, larger error"


def test_step_cost_runs():
    out = run("step_cost.py", "--steps", 3, "--batch", 4, "--size", 16, "--threads", 1)
    median, low, high = map(float, re.search(r"ratio CDM/DDPM: median (\S+)x \(min (\S+), max (\S+)\)", out).groups())
    assert low <= median <= high and median > 1, "a CDM step (forward, backward, double backward) costs more"


def test_likelihood_cost_runs():
    out = run("likelihood_cost.py", "--images", 1, "--timesteps", 20, "--bpd-images", 4, "--no-tracking")
    bpd = float(re.search(r"CDM bits/dim on 4 test images: (\S+) \(untrained\)", out)[1])
    assert abs(bpd - standard_normal_bpd(4)) < 0.05, (bpd, standard_normal_bpd(4))
    cdm_ms, ddpm_ms = map(float, re.findall(r"([\d.]+) ms / image", out))
    assert abs(int(re.search(r"ratio: (\d+)x", out)[1]) - ddpm_ms / cdm_ms) <= 0.51


def test_ood_baselines_run_and_are_tracked(tmp_path):
    tiny = ["--steps", 2, "--images", 6, "--val-images", 6, "--volumes", "2,1,1", "--elbo-steps", 2, "--recon-steps", 2]
    out = run("ood_baselines.py", *tiny, "--figures", tmp_path / "img", "--out", tmp_path / "out", cwd=tmp_path)
    assert "| max-softmax classifier |" in out and "| DDPM bound (MONAI) |" in out and "| CDM combined |" in out
    assert "| CDM classifier |" in out, "the MNIST CDM is class-conditional: it is also a generative classifier"
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == [
        "ood-baselines-mnist.png", "ood-baselines-phantoms.png", "ood-sets-mnist.png", "ood-sets-phantoms.png"
    ]  # fmt: skip
    phantoms = (tmp_path / "out" / "phantoms.md").read_text()
    assert phantoms.count("| CDM multiscale |") == 2 and "| CDM classifier |" not in phantoms
    assert (tmp_path / "mlflow.db").stat().st_size > 0
    for text, num_classes in ((out.split("phantoms:")[0], 10), (phantoms, None)):  # the MNIST CDM has 10 labels
        rows = [
            cells(line) for line in text.splitlines() if line.startswith("| ") and not line.startswith("| detector")
        ]
        assert len(rows) == 2 * len({row[0] for row in rows}), "an AUROC and an FPR95 row per detector"
        for detector, *values, mean, passes, _ in rows:
            values = [float(v) for v in values]
            assert all(0 <= v <= 1 for v in values) and abs(float(mean) - np.mean(values)) <= 0.001, detector
            if detector.startswith("CDM "):
                assert float(passes) == DETECTORS[detector[4:]](1, 8, num_classes).cost(2), detector


def test_score_throughput_runs(checkpoint):
    out = run("score_throughput.py", "--checkpoint", checkpoint, "--volumes", 1, "--repeats", 1)
    bare, full, ratio = map(
        float, re.search(r"bare forward: +(\S+) .*\ncdm-ood score: +(\S+) .*\nratio: (\S+)", out).groups()
    )
    assert out.startswith("16 slices of 16x16") and full < bare, "the scoring job includes the bare forward pass"
    assert abs(ratio - full / bare) <= 0.006


def test_bombs_are_refused_beside_a_scored_series(checkpoint):
    out = run("bombs.py", "--checkpoint", checkpoint)  # exits 1 unless every bomb is refused, the peak under 2 GiB
    rows = [cells(line) for line in out.splitlines() if line.startswith("| ") and not line.startswith("| file")]
    assert len(rows) == 6 and all(row[3] == "unreadable" for row in rows), out
    assert "control series: 8 of 8 slices scored beside the bombs" in out


def test_ranking_measures_every_degradation_family_and_criterion(checkpoint):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ranking_benchmark", BENCHMARKS / "ranking.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    CRITERIA, DEGRADATIONS, HELD_OUT = bench.CRITERIA, bench.DEGRADATIONS, bench.HELD_OUT
    out = run("ranking.py", "--checkpoint", checkpoint, "--images", 1, "--samples", 2, "--steps", 3)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| degradation")]
    for name in DEGRADATIONS:
        assert sum(line.startswith(f"| {name} |") for line in rows) == 2 * len(CRITERIA), name
    assert f"| {HELD_OUT} |" in out and "| hallucination |" in out
    assert out.strip().splitlines()[-1].split(": ")[-1] in CRITERIA, "the choice is printed"
    for criterion in ("map", "expected-mse"):  # mild noise: the data term orders candidates by their quality
        row = next(cells(line) for line in rows if line.startswith(f"| noise 0.05 | {criterion} |"))
        assert float(row[2]) > 0.5 and float(row[6]) == 1.0, row


def test_real_scans_runs_on_the_ood_sets(checkpoint, tmp_path):
    from cdm_ood.data.phantoms import make_phantoms

    make_phantoms(tmp_path / "ood", 1, "nifti", size=16, slices=2, seed=1, ood_sets=True)
    train = make_phantoms(tmp_path / "train", 2, "nifti", size=16, slices=2, seed=2)
    out = run("real_scans.py", "--checkpoint", checkpoint, "--data", tmp_path / "ood", "--train", train, "--steps", 1,
              "--elbo-steps", 2, "--recon-steps", 2, "--out", tmp_path / "out")  # fmt: skip
    assert "AUROC, volume level" in out and "| DDPM reconstruction SSIM |" in out and "| CDM nll |" in out
    rows = json.loads((tmp_path / "out" / "real-scans.json").read_text())
    assert {r["detector"] for r in rows["volume"]} >= {"CDM nll", "DDPM bound (MONAI)"}
    assert {"motion-reject", "ap-flip", "wrong-modality"} <= set(rows["slice"][0]["metrics"])
    (multiscale,) = [r["metrics"] for r in rows["slice"] if r["detector"] == "CDM multiscale"]
    assert multiscale["wrong-modality"]["auroc"] >= 0.9, "MR slices given to the CT model rank above the clean CT"


def test_localization_measures_every_defect(tmp_path):
    out = run("localization.py", "--steps", 2, "--volumes", "2,1,1", "--figures", tmp_path / "img", "--out",
              tmp_path / "out", "--no-tracking")  # fmt: skip
    rows = json.loads((tmp_path / "out" / "phantoms.json").read_text())
    assert [r["defect"] for r in rows] == ["metal-streak", "lesion", "foreign-object", "local-ghost"]
    assert all(0 <= r["peak_in_mask"] <= 1 and r["slices"] > 0 for r in rows)
    assert all(r["pixel_auroc"] > 0.6 for r in rows), "even a barely trained map is higher on the defects' pixels"
    assert "| defect | slices | pixel AUROC |" in out and "| local-ghost |" in out
    assert (tmp_path / "img" / "localization-phantoms.png").stat().st_size > 1000
