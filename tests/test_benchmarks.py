"""The benchmark scripts run in their smallest setting (the numbers are in the docs, not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from tables import blocks  # noqa: E402


def run(script: str, *args, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                         text=True, timeout=300, cwd=cwd)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_normalisation_runs_and_is_tracked(tmp_path):
    out = run("normalisation.py", "--steps", 2, "--size", 8, "--eval", 50, cwd=tmp_path)
    assert "iid uniform" in out and "Gaussian mixture" in out
    assert (tmp_path / "mlflow.db").stat().st_size > 0


def test_ablations_then_denoising_run(tmp_path):
    tiny = ["--set", "model.channels=[8, 8]", "--set", "model.attention_levels=[false, false]", "--set",
            "model.num_head_channels=8", "--set", "schedule.T=20", "--set", "train.batch_size=8"]  # fmt: skip
    out = run("ablations.py", "--steps", 1, "--test-images", 10, "--sample-steps", 2, "--out", tmp_path / "runs",
              "--figures", tmp_path / "img", "--no-tracking", "--variants", "both,ce-only", *tiny,
              cwd=tmp_path)  # fmt: skip
    assert "| ce-only |" in out and len(list((tmp_path / "img").glob("ablation-*.png"))) == 2
    out = run("denoising.py", "--cdm", tmp_path / "runs" / "both" / "model.pt", "--images", 10, "--steps", 2,
              "--no-tracking")  # fmt: skip
    assert "CDM MSE" in out


def test_step_cost_runs():
    out = run("step_cost.py", "--steps", 1, "--batch", 4, "--size", 16, "--threads", 1)
    assert "ratio CDM/DDPM" in out and "CDM step" in out


def test_likelihood_cost_runs():
    assert "ratio:" in run("likelihood_cost.py", "--images", 1, "--timesteps", 20, "--bpd-images", 4, "--no-tracking")


def test_ood_baselines_run_and_are_tracked(tmp_path):
    tiny = ["--steps", 2, "--images", 6, "--val-images", 6, "--volumes", "2,1,1", "--elbo-steps", 2, "--recon-steps", 2]
    out = run("ood_baselines.py", *tiny, "--figures", tmp_path / "img", "--out", tmp_path / "out", cwd=tmp_path)
    assert set(blocks(out)) == {"ood-baselines-mnist", "ood-baselines-phantoms"}
    assert "| max-softmax classifier |" in out and "| DDPM bound (MONAI) |" in out and "| CDM combined |" in out
    assert "| CDM classifier |" in out, "the MNIST CDM is class-conditional: it is also a generative classifier"
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == [
        "ood-baselines-mnist.png", "ood-baselines-phantoms.png", "ood-sets-mnist.png", "ood-sets-phantoms.png"
    ]  # fmt: skip
    phantoms = (tmp_path / "out" / "phantoms.md").read_text()
    assert phantoms.count("| CDM multiscale |") == 2 and "| CDM classifier |" not in phantoms
    assert (tmp_path / "mlflow.db").stat().st_size > 0


@pytest.mark.parametrize(
    "script, args",
    [
        ("score_throughput.py", ["--volumes", 1, "--repeats", 1]),
        ("bombs.py", []),  # exits 1 unless every bomb is refused and the peak stays under 2 GiB
    ],
)
def test_scripts_on_the_tiny_checkpoint_run(checkpoint, script, args):
    assert run(script, "--checkpoint", checkpoint, *args)


def test_ranking_measures_every_degradation_family_and_criterion(checkpoint):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ranking_benchmark", BENCHMARKS / "ranking.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    CRITERIA, DEGRADATIONS, HELD_OUT = bench.CRITERIA, bench.DEGRADATIONS, bench.HELD_OUT
    out = blocks(run("ranking.py", "--checkpoint", checkpoint, "--images", 1, "--samples", 2, "--steps", 3))["ranking"]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| degradation")]
    for name in DEGRADATIONS:
        assert sum(line.startswith(f"| {name} |") for line in rows) == 2 * len(CRITERIA), name
    assert f"| {HELD_OUT} |" in out and "| hallucination |" in out
    assert out.strip().splitlines()[-1].split(": ")[-1] in CRITERIA, "the choice is printed"


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


def test_localization_measures_every_defect(tmp_path):
    out = run("localization.py", "--steps", 2, "--volumes", "2,1,1", "--figures", tmp_path / "img", "--out",
              tmp_path / "out", "--no-tracking")  # fmt: skip
    rows = json.loads((tmp_path / "out" / "phantoms.json").read_text())
    assert [r["defect"] for r in rows] == ["metal-streak", "lesion", "foreign-object", "local-ghost"]
    assert all(0 <= r["pixel_auroc"] <= 1 and 0 <= r["peak_in_mask"] <= 1 and r["slices"] > 0 for r in rows)
    assert "| defect | slices | pixel AUROC |" in out and "| local-ghost |" in out
    assert (tmp_path / "img" / "localization-phantoms.png").stat().st_size > 1000
