"""The benchmark scripts run in their smallest setting: each printed table block parses and its numbers agree with
each other (a ratio with its parts, counts with the setting); the measured values themselves are in the docs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from tables import blocks

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


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


def table(block: str, header: str) -> dict[str, list[str]]:
    """The rows (cells after the first, by first cell) of the markdown table in `block` whose header starts with
    `header`."""
    text = block[block.index(f"| {header}") :].split("\n\n")[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    return {row[0]: row[1:] for row in cells}


def number(cell: str) -> float:
    """The first number in a cell (`**2.73x** (min ...)` -> 2.73, `-0.01 s` -> -0.01)."""
    return float(re.search(r"-?\d+(\.\d+)?", cell)[0])


def test_step_cost_prints_ratio_variants_and_phases():
    out = run("step_cost.py", "--steps", 1, "--warmup", 0, "--batch", 4, "--size", 16, "--threads", 1)
    block = blocks(out)["step-cost"]
    steps = table(block, "model")
    ddpm, cdm = (
        number(steps[k][0]) for k in ("DDPM (MONAI UNet, eps-prediction MSE)", "CDM (`cdm_loss`, same UNet + head)")
    )
    assert number(steps["**ratio**"][0]) == pytest.approx(cdm / ddpm, rel=0.02, abs=0.01), "one step: its own ratio"
    swaps = table(block, "both networks")
    assert set(swaps) == {"every GroupNorm replaced by identity", "every SiLU replaced by ReLU"}
    for d, c, ratio in swaps.values():
        assert number(ratio) == pytest.approx(number(c) / number(d), rel=0.02, abs=0.01)
    phases = table(block, "phase of one CDM step")
    assert list(phases) == ["forward", "input gradient (`create_graph=True`)", "double backward, loss and Adam step"]
    assert sum(number(v[0]) for v in phases.values()) == pytest.approx(cdm, rel=0.02), "they add up to the CDM step"


def test_step_cost_swaps_every_module_of_the_kind():
    from step_cost import VARIANTS, swapped

    from cdm_ood import CDMClassifier

    model = CDMClassifier(2, 1, 10, channels=(8, 8), attention_levels=(False, True), norm_num_groups=8,
                          num_head_channels=8)  # fmt: skip
    for old, new, _ in filter(None, VARIANTS.values()):
        copy = swapped(model, old, new)
        before = sum(isinstance(m, old) for m in model.modules())
        assert before > 0 and not any(isinstance(m, old) for m in copy.modules())
        assert sum(isinstance(m, new) for m in copy.modules()) >= before and isinstance(copy, CDMClassifier)
        assert any(isinstance(m, old) for m in model.modules()), "the original is left as it was"


def test_likelihood_cost_counts_network_calls():
    out = run(
        "likelihood_cost.py", "--images", 1, "--timesteps", 20, "--bpd-images", 4, "--no-tracking", "--threads", 1
    )
    block = blocks(out)["likelihood-cost"]
    rows = table(block, "method")
    cdm, ddpm = (
        rows["CDM `log_likelihood` (Theorem 3.2)"],
        rows["MONAI `DiffusionInferer.get_likelihood` (DDPM variational bound, T = 20)"],
    )
    assert (cdm[1], ddpm[1]) == ("1", "20"), "one forward pass against one call per timestep"
    assert number(rows["ratio"][0]) == pytest.approx(number(ddpm[0]) / number(cdm[0]), abs=1)
    bpd = float(re.search(r"The CDM \(untrained\): ([\d.]+) bits/dim on 4 bundled MNIST test images", block)[1])
    assert 5 < bpd < 12, "an untrained CDM is far from the data (8 bits/dim is a uniform model)"


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


def test_bombs_runs_on_the_tiny_checkpoint(checkpoint):
    assert run("bombs.py", "--checkpoint", checkpoint)  # exits 1 unless every bomb is refused and the peak < 2 GiB


def test_score_throughput_measures_each_worker_count(checkpoint):
    out = run("score_throughput.py", "--checkpoint", checkpoint, "--volumes", 1, "--repeats", 1, "--workers", 0, 1)
    block = blocks(out)["score-throughput"]
    rows = table(block, "workers")
    assert list(rows) == ["0 (default)", "1"]
    for bare, score, ratio in rows.values():
        assert number(ratio) > 0 and number(ratio) == pytest.approx(number(score) / number(bare), abs=0.01)
    assert "16 slices of 16x16" in block and "in process, 16 files: discover" in block


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


def test_train_time_reads_the_run_it_leaves(tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["--config", "digits-cpu", "--steps", 3, "--set", "train.val_every=2", "--set", "train.val_samples=32"]
    out = run("train_time.py", "--out-dir", run_dir, *tiny, "--no-mlflow")
    rows = table(blocks(out)["train-time"], "config")
    ((config, (steps, per_step, wall, bpd, peak)),) = rows.items()
    assert config.startswith("`digits-cpu` (batch 32, 8x8, UNet (16, 32, 32)") and steps == "3"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [f"{r['step']}: {r['val_bpd']:.2f}" for r in records if "val_bpd" in r]
    assert len(validations) == 2 and bpd == f"{validations[-1].split(': ')[1]} ({validations[0]})"
    assert 0 < number(per_step) < number(wall) and 0.1 < number(peak) < 4, "seconds; GiB of a torch process"
    assert (run_dir / "model.pt").is_file(), "the trained model stays for the next evidence steps"
    again = subprocess.run([sys.executable, str(BENCHMARKS / "train_time.py"), "--out-dir", str(run_dir)],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode != 0 and "--replace" in again.stderr and (run_dir / "model.pt").is_file()
