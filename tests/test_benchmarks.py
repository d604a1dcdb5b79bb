"""The benchmark scripts run in their smallest setting and print the table blocks the docs are made from. The
numbers of the real settings are in the docs; here each block is checked for a result that a wrong computation
would change (a closed form, an ordering that holds even for an untrained model, a gross corruption ranked above
clean images, a table consistent with itself)."""

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm_ood.data.artifacts import ARTIFACTS
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.model.checkpoint import load_checkpoint, load_model
from cdm_ood.ood.batch import auto_workers
from cdm_ood.ood.detectors import DETECTORS

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from processes import clean_env, warm_run  # noqa: E402
from tables import blocks, clopper_pearson  # noqa: E402


def cells(line: str) -> list[str]:
    """The cells of a markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(output: str, name: str) -> list[list[str]]:
    """The cells of the markdown table in block `name` of a script's output (header and rule left out)."""
    lines = [line for line in blocks(output)[name].splitlines() if line.startswith("| ")]
    return [cells(line) for line in lines[1:]]


def run(script: str, *args, cwd: Path | None = None) -> str:
    """The script's output; it runs without MLflow settings (an earlier test's `mlflow.set_tracking_uri` leaves
    MLFLOW_TRACKING_URI in this process's environment), so a tracked run goes to `cwd`'s own store."""
    out = warm_run(str(BENCHMARKS / script), args, cwd or Path.cwd(), clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def standard_normal_bpd(n: int) -> float:
    """Mean bits/dim of the first `n` bundled MNIST test images under N(0, I), by hand: what eq. 10 gives for a CDM
    whose logits are all about equal (untrained, or one training step in; random inits move it by < 0.02)."""
    x = np.stack([s["image"] for s in bundled_mnist("test")[:n]]).reshape(n, -1) / 127.5 - 1
    d = x.shape[1]
    return float(np.mean((0.5 * d * math.log(2 * math.pi) + 0.5 * np.square(x).sum(1)) / (d * math.log(2)) + 7))


def separated_mixture_bpd(weights: list[float], stds: list[float], d: int) -> float:
    """Bits/dim (8-bit offset) of a mixture of well-separated isotropic Gaussians in d dimensions: its entropy is
    H(weights) + sum_k w_k (d / 2) ln(2 pi e s_k^2) nats."""
    nats = -sum(w * math.log(w) for w in weights) / d
    nats += sum(w * 0.5 * math.log(2 * math.pi * math.e * s * s) for w, s in zip(weights, stds, strict=True))
    return nats / math.log(2) + 7


def test_normalisation_prints_the_exact_bits_per_dim_and_is_tracked(tmp_path):
    out = run("normalisation.py", "--steps", 2, "--size", 8, "--eval", 50, cwd=tmp_path)
    (uniform, exact_u, cdm_u, diff_u, _), (mixture, exact_m, cdm_m, diff_m, _) = table(out, "normalisation")
    assert uniform == "iid uniform on [-1, 1]" and exact_u == "8.000", "-log2(1/2) + 7 bits/dim, exactly"
    weights, stds = (
        list(map(float, v.split(" / "))) for v in re.search(r"weights (.*), stds (.*)\)", mixture).groups()
    )
    assert float(exact_m) == pytest.approx(separated_mixture_bpd(weights, stds, 8 * 8), abs=0.15)
    for exact, cdm, diff in ((exact_u, cdm_u, diff_u), (exact_m, cdm_m, diff_m)):
        assert abs(float(cdm) - float(exact) - float(diff)) <= 0.0015 and math.isfinite(float(cdm))
        assert float(cdm) > float(exact), "the expected bits/dim of a model is never below the data's (Gibbs)"
    assert (tmp_path / "mlflow.db").stat().st_size > 0


def test_ablations_then_denoising_print_their_tables(tmp_path):
    import torch

    from cdm_ood import bits_per_dim, log_likelihood
    from cdm_ood.diffusion.sampling import matching_level
    from cdm_ood.model.checkpoint import load_model

    tiny = ["--set", "model.channels=[8, 8]", "--set", "model.attention_levels=[false, false]", "--set",
            "model.num_head_channels=8", "--set", "schedule.T=20", "--set", "train.batch_size=8"]  # fmt: skip
    out = run("ablations.py", "--steps", 1, "--test-images", 10, "--sample-steps", 2, "--out", tmp_path / "runs",
              "--figures", tmp_path / "img", "--no-tracking", "--variants", "both,ce-only", *tiny,
              cwd=tmp_path)  # fmt: skip
    both, ce_only = table(out, "ablations")
    assert both[1] == "-" and ce_only[1] == "`loss.ce_weight=1.0 loss.mse_weight=0.0`"
    assert both[4] == "![both](img/ablation-both.png)" and ce_only[4] == "![ce-only](img/ablation-ce-only.png)"
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["ablation-both.png", "ablation-ce-only.png"]
    model = load_model(tmp_path / "runs" / "both" / "model.pt")
    x = torch.from_numpy(np.stack([s["image"] for s in bundled_mnist("test")[:10]]).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        bpd = bits_per_dim(log_likelihood(model.classifier, x, model.schedule).double(), x[0].numel()).mean().item()
    assert float(both[2]) == pytest.approx(bpd, abs=0.0015), "the table gives the trained model's test bits/dim"
    assert abs(bpd - standard_normal_bpd(10)) < 0.05, "one step in, eq. 10 is about the standard normal's density"
    losses = {
        name: load_checkpoint(tmp_path / "runs" / name / "model.pt")["config"]["loss"] for name in ("both", "ce-only")
    }
    assert (losses["ce-only"]["ce_weight"], losses["ce-only"]["mse_weight"]) == (1.0, 0.0), "the variant's overrides"
    assert min(losses["both"]["ce_weight"], losses["both"]["mse_weight"]) > 0

    out = run("denoising.py", "--cdm", tmp_path / "runs" / "both" / "model.pt", "--images", 10, "--steps", 2,
              "--no-tracking")  # fmt: skip
    rows = table(out, "denoising")
    assert [int(t) for _, t, *_ in rows] == [matching_level(model.schedule, float(r)) for r, *_ in rows]
    for _, _, cdm, ddpm, better in rows:
        assert better == ("CDM" if float(cdm) < float(ddpm) else "DDPM")
    assert all(float(rows[-1][i]) > float(rows[0][i]) for i in (2, 3)), "x0_hat is worse at the highest noise"
    # x_t / alpha_t (the image plus noise of std sigma/alpha) has error ratio^2; guessing 0 for data in [-1, 1] has
    # error E[x0^2] < 1: even a barely trained denoiser beats both bounds (one with the noise's sign lost does not)
    cdm = [float(c) for _, _, c, _, _ in rows]
    assert all(c < min(float(r) ** 2, 1.0) for (r, *_), c in zip(rows, cdm, strict=True)), rows
    assert cdm == sorted(cdm), "more noise, larger error"


def test_sampler_accuracy_prints_the_tested_rows_and_the_reference_rule_fails(monkeypatch, capsys):
    import importlib

    from exact_mixture import ROWS

    bench = importlib.import_module("sampler_accuracy")
    monkeypatch.setattr(sys, "argv", ["sampler_accuracy.py", "--rows", "dpm2-25,single-step-betas", "--no-tracking"])
    bench.main()
    dpm2, single = table(capsys.readouterr().out, "sampler-accuracy")
    row = next(r for r in ROWS if (r.method, r.steps) == ("dpm2", 25))
    assert dpm2[:3] == ["`dpm2`", "25", str(row.samples)] and dpm2[6] == bench.tolerance(row.tolerance)
    errors = (float(dpm2[3]), float(dpm2[4]), float(dpm2[5].rstrip("%")) / 100)
    assert all(e <= t for e, t in zip(errors, row.tolerance, strict=True)), errors
    assert single[6].startswith("fails ") and float(single[5].rstrip("%")) > 100, single


def table_rows(block: str, header: str) -> dict[str, list[str]]:
    """The rows (cells after the first, by first cell) of the markdown table in `block` whose header starts with
    `header`."""
    text = block[block.index(f"| {header}") :].split("\n\n")[0]
    return {row[0]: row[1:] for row in map(cells, text.splitlines()[2:])}


def number(cell: str) -> float:
    """The first number in a cell (`**2.73x** (min ...)` -> 2.73, `-0.01 s` -> -0.01)."""
    return float(re.search(r"-?\d+(\.\d+)?", cell)[0])


def test_step_cost_prints_ratio_variants_and_phases():
    out = run("step_cost.py", "--steps", 1, "--warmup", 0, "--batch", 4, "--size", 16, "--threads", 1)
    block = blocks(out)["step-cost"]
    steps = table_rows(block, "model")
    labels = ["DDPM (MONAI UNet, eps-prediction MSE)", "CDM `unet` (`cdm_loss`, same UNet + head)",
              "CDM `encoder` (`cdm_loss`, encoder-only: the UNet's down path and middle block + head)"]  # fmt: skip
    assert list(steps) == labels
    cdm = {arch: number(steps[label][0]) for arch, label in zip(("unet", "encoder"), labels[1:], strict=True)}
    assert number(steps[labels[1]][1]) > 1, (
        "a CDM step (forward, backward, double backward) of the same UNet costs more"
    )
    assert cdm["encoder"] < cdm["unet"], "the encoder-only classifier drops the decoder from every pass"
    swaps = table_rows(block, "the UNet pair")
    assert set(swaps) == {"every GroupNorm replaced by identity", "every SiLU replaced by ReLU"}
    for d, c, ratio in swaps.values():
        assert number(ratio) == pytest.approx(number(c) / number(d), rel=0.02, abs=0.01)
    phases = table_rows(block, "phase of one CDM step")
    assert list(phases) == ["forward", "input gradient (`create_graph=True`)", "double backward, loss and Adam step"]
    for i, arch in enumerate(("unet", "encoder")):
        total = sum(number(v[i]) for v in phases.values())
        assert total == pytest.approx(cdm[arch], rel=0.02), "the phases add up to the CDM step"
    sampler = table_rows(block, "one sampler step")
    denoisers = [f"CDM `{arch}` gradient denoiser (forward + backward)" for arch in ("unet", "encoder")]
    assert list(sampler) == ["DDPM UNet forward (no graph)", *denoisers]
    assert all(number(sampler[label][1]) > 0 for label in denoisers)


def test_step_cost_swaps_every_module_of_the_kind():
    from step_cost import SWAPS, swapped

    from cdm_ood import CDMClassifier

    model = CDMClassifier(2, 1, 10, channels=(8, 8), attention_levels=(False, True), norm_num_groups=8,
                          num_head_channels=8)  # fmt: skip
    for old, new, _ in SWAPS.values():
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
    rows = table_rows(block, "method")
    ddpm = rows["MONAI `DiffusionInferer.get_likelihood` (DDPM variational bound, T = 20)"]
    assert ddpm[1] == "20"
    for arch in ("unet", "encoder"):
        cdm = rows[f"CDM `{arch}` `log_likelihood` (Theorem 3.2)"]
        assert cdm[1] == "1", "one forward pass against one call per timestep"
        assert number(rows[f"ratio `{arch}`"][0]) == pytest.approx(number(ddpm[0]) / number(cdm[0]), abs=1)
    pattern = r"The CDM `unet` \(untrained\): ([\d.]+) bits/dim on 4 bundled MNIST test images"
    bpd = float(re.search(pattern, block)[1])
    assert abs(bpd - standard_normal_bpd(4)) < 0.05, "an untrained CDM's eq. 10 is the standard normal's density"


def assert_one_reconstruction_gives_both_errors(rows: list[dict]) -> None:
    """The ddpm-ood MSE and SSIM rows come from the same reconstructions: one timing and one cost, two scores."""
    mse, ssim = ([r for r in rows if r["detector"] == f"DDPM reconstruction {e}"] for e in ("MSE", "SSIM"))
    assert len(mse) == len(ssim) == 1
    assert mse[0]["ms_per_image"] == ssim[0]["ms_per_image"] and mse[0]["passes"] == ssim[0]["passes"]
    assert mse[0]["metrics"] != ssim[0]["metrics"]


def test_ood_baselines_run_and_are_tracked(tmp_path):
    tiny = ["--steps", 2, "--images", 6, "--val-images", 6, "--volumes", "2,1,1", "--elbo-steps", 2, "--recon-steps", 2]
    out = run("ood_baselines.py", *tiny, "--figures", tmp_path / "img", "--out", tmp_path / "out", cwd=tmp_path)
    assert set(blocks(out)) == {"ood-baselines-mnist", "ood-baselines-phantoms"}
    assert "| max-softmax classifier |" in out and "| DDPM bound (MONAI) |" in out and "| CDM combined |" in out
    assert "| CDM classifier |" in out, "the MNIST CDM is class-conditional: it is also a generative classifier"
    accuracy = re.search(r"CDM generative classifier test accuracy (\d\.\d{3})", out)
    assert accuracy and 0 <= float(accuracy[1]) <= 1, "the header says how well the CDM classifies the digits"
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == [
        "ood-baselines-mnist.png", "ood-baselines-phantoms.png", "ood-sets-mnist.png", "ood-sets-phantoms.png"
    ]  # fmt: skip
    assert_one_reconstruction_gives_both_errors(json.loads((tmp_path / "out" / "phantoms.json").read_text()))
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


def test_bombs_are_refused_beside_a_scored_series(checkpoint):
    out = blocks(run("bombs.py", "--checkpoint", checkpoint))["bombs"]  # exits 1 unless all refused, peak < 2 GiB
    rows = [cells(line) for line in out.splitlines() if line.startswith("| ") and not line.startswith("| file")]
    assert len(rows) == 6 and all(row[3] == "unreadable" for row in rows), out
    assert "control series: 8 of 8 slices scored beside the bombs" in out


def test_many_files_gives_every_file_a_row(checkpoint):
    out = blocks(run("many_files.py", "--checkpoint", checkpoint, "--files", 216))["many-files"]  # exits 1 on a miss
    (row,) = table_rows(out, "files").values()
    assert row[:4] == ["100", "100", "16", "1"], "100 sidecars ignored, 100 binaries unreadable, the series scored"
    assert 0.1 < number(row[5]) < 4, "a child process with torch loaded: GiB"


def test_score_throughput_measures_each_worker_count(checkpoint):
    out = run("score_throughput.py", "--checkpoint", checkpoint, "--volumes", 1, "--repeats", 1, "--size", 48,
              "--workers", "auto", 0, 1)  # fmt: skip
    block = blocks(out)["score-throughput"]
    text = block[block.index("| model") :].split("\n\n")[0]
    rows = [cells(line) for line in text.splitlines()[2:]]
    auto = auto_workers(torch.device("cpu"))
    assert [row[:2] for row in rows] == [["16x16 unet", w] for w in (f"auto (default): {auto}", "0", "1")]
    for _, _, bare, score, ratio in rows:
        assert number(ratio) > 0 and number(ratio) == pytest.approx(number(score) / number(bare), abs=0.01)
        assert number(score) < number(bare), "the scoring job includes the bare scoring"
    assert "; 16 DICOM slices of 48x48, batch 64" in block and "in ms per slice: 16x16 unet: discover" in block


def test_precision_calibrates_each_precision_and_compares_every_detector(checkpoint, tmp_path):
    make_phantoms(tmp_path / "calib", 2, "nifti", size=16, slices=4, seed=3)
    manifest = make_phantoms(tmp_path / "test", 1, "nifti", size=16, slices=4, seed=4, corrupt=True)
    block = blocks(run("precision.py", "--checkpoint", checkpoint, "--calib", tmp_path / "calib", "--test",
                       manifest))["score-precision"]  # fmt: skip
    rows = table_rows(block, "detector")
    assert set(rows) == set(load_checkpoint(checkpoint)["calibration"]["detectors"])
    for auroc32, auroc16, moved, same in rows.values():
        assert 0 <= number(auroc32) <= 1 and 0 <= number(auroc16) <= 1 and 0 <= number(same) <= 1
        assert number(moved) < 1, "bf16 moves the scores by less than their in-distribution spread"
    assert max(number(r[2]) for r in rows.values()) > 0, "the bf16 features differ: autocast ran"
    assert "4 in-distribution and 48 corrupted test slices of 13 series" in block


def test_score_memory_runs_the_real_command_per_folder_size(checkpoint):
    out = run("score_memory.py", "--checkpoint", checkpoint, "--files", 16, 32, "--size", 16)
    rows = table_rows(blocks(out)["score-memory"], "files")
    assert list(rows) == ["16", "32"] and [r[0] for r in rows.values()] == ["16", "32"], "every slice is scored"
    (_, first, _, _), (_, second, _, ratio) = rows.values()
    # each cell is rounded to 3 decimals: the ratio of the printed sizes is off by at most that rounding
    a, b = number(first), number(second)
    assert number(ratio) == pytest.approx(b / a, abs=b / a * (0.0005 / a + 0.0005 / b) + 0.0005)
    assert 0.1 < number(first) < 4, "a child process with torch loaded: GiB, not bytes or kilobytes"


def test_node_receive_counts_what_the_node_stored_and_times_a_verdict(checkpoint):
    out = run("node_receive.py", "--checkpoint", checkpoint, "--instances", 20, "--size", 16, "--per-series", 10,
              "--quiet", 1, "--latency-slices", 4, "--associations", 1, 3)  # fmt: skip
    rows = table(out, "node-receive")
    runs, marks = rows[:2], [r for r in rows[2:] if r[0] != "instances received"]
    assert [(r[0], r[1]) for r in runs] == [("1", "20"), ("3", "20")]
    for r in runs:
        assert float(r[3]) == pytest.approx(20 / float(r[2]), rel=0.05, abs=1)
        assert number(r[6]) >= number(r[5]) > 50, "a child process with torch loaded: MiB"
    counts = [int(m[0]) for m in marks]
    assert counts == sorted(counts) and counts[-1] == 20, "the memory as the instances arrive, the last at the end"
    ((quiet, n, waited, decision),) = table(out, "node-latency")
    assert (quiet, n) == ("1 s", "4") and decision in ("forward", "hold") and number(waited) >= 1, "quiet waited"


def test_auto_workers_leave_the_network_its_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    threads = torch.get_num_threads()
    assert auto_workers(torch.device("cpu")) == max(0, min(4, 16 - threads))
    assert auto_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert auto_workers(torch.device("cpu")) == max(0, 2 - threads) and auto_workers(torch.device("cuda")) == 1


def test_ranking_hallucinations_come_from_another_case_at_the_same_position():
    import importlib

    another_case = importlib.import_module("ranking").another_case
    assert [another_case(["0", "1", "2", "3"], i) for i in range(3)] == [1, 2, 3], "MNIST: the next image"
    slices = ["a"] * 3 + ["b"] * 3 + ["c"]
    assert [another_case(slices, i) for i in range(6)] == [3, 4, 5, 6, 1, 2], "the same slice of another volume"
    with pytest.raises(SystemExit, match="two cases"):
        another_case(["a", "a", "a"], 0)


def test_ranking_measures_every_degradation_family_and_criterion(checkpoint):
    import importlib

    bench = importlib.import_module("ranking")
    CRITERIA, DEGRADATIONS, HELD_OUT = bench.CRITERIA, bench.DEGRADATIONS, bench.HELD_OUT
    out = blocks(run("ranking.py", "--checkpoint", checkpoint, "--images", 1, "--samples", 2, "--steps", 3))["ranking"]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| degradation")]
    for name in DEGRADATIONS:
        assert sum(line.startswith(f"| {name} |") for line in rows) == 2 * len(CRITERIA), name
    assert f"| {HELD_OUT} |" in out and "| hallucination |" in out
    assert out.strip().splitlines()[-1].split(": ")[-1] in CRITERIA, "the choice is printed"
    for criterion in ("auto", "map", "expected-mse", "candidate-posterior"):  # mild noise: the data term orders
        row = next(cells(line) for line in rows if line.startswith(f"| noise 0.05 | {criterion} |"))
        assert float(row[2]) > 0.5 and float(row[7]) == 1.0, row


def test_prior_weight_chooses_the_best_worst_case_on_images_no_table_uses(checkpoint):
    import importlib

    bench = importlib.import_module("ranking")
    out = run("prior_weight.py", "--model", checkpoint, "--model", f"{checkpoint}=mnist", "--images", 2,
              "--prior-weights", "1,0")  # fmt: skip
    assert not blocks(out), "development numbers are never a table"
    line = (r"^development (.*) \| (.*) \| prior weight ([\d.]+): tau PSNR all (-?[\d.]+), "
            r"hallucination below truth ([\d.]+), truth first ([\d.]+)$")  # fmt: skip
    found = re.findall(line, out, flags=re.MULTILINE)
    operators = [name for name, (kind, _, _) in bench.DEGRADATIONS.items() if kind != "noise"]
    assert [(d, float(b)) for _, d, b, *_ in found] == [(d, b) for _ in (1, 2) for d in operators for b in (1, 0)]
    assert all(-1 <= float(t) <= 1 and 0 <= float(h) <= 1 and 0 <= float(f) <= 1 for *_, t, h, f in found)
    worst = {b: (min(float(h) for *_, b_, _, h, _ in found if float(b_) == b),
                 min(float(t) for *_, b_, t, _, _ in found if float(b_) == b)) for b in (1.0, 0.0)}  # fmt: skip
    chosen = float(re.search(r"^chosen prior weight: ([\d.]+) ", out, flags=re.MULTILINE)[1])
    assert chosen == max(worst, key=lambda b: (worst[b][0] == 1, *worst[b], b)), worst
    model = load_model(checkpoint)
    test_images, development = (bench.held_out(model, None, 2, development=d)[0] for d in (False, True))
    assert not torch.equal(test_images, development), "the development images are not the reported ones"


def test_real_scans_runs_on_the_ood_sets(checkpoint, tmp_path):

    make_phantoms(tmp_path / "ood", 1, "nifti", size=16, slices=2, seed=1, ood_sets=True)
    train = make_phantoms(tmp_path / "train", 2, "nifti", size=16, slices=2, seed=2)
    out = run("real_scans.py", "--checkpoint", checkpoint, "--data", tmp_path / "ood", "--train", train, "--steps", 1,
              "--elbo-steps", 2, "--recon-steps", 2, "--out", tmp_path / "out")  # fmt: skip
    assert "AUROC, volume level" in out and "| DDPM reconstruction SSIM |" in out and "| CDM nll |" in out
    rows = json.loads((tmp_path / "out" / "real-scans.json").read_text())
    assert {r["detector"] for r in rows["volume"]} >= {"CDM nll", "DDPM bound (MONAI)"}
    assert {"motion-reject", "ap-flip", "wrong-modality"} <= set(rows["slice"][0]["metrics"])
    assert_one_reconstruction_gives_both_errors(rows["slice"])
    (multiscale,) = [r["metrics"] for r in rows["slice"] if r["detector"] == "CDM multiscale"]
    assert multiscale["wrong-modality"]["auroc"] >= 0.9, "MR slices given to the CT model rank above the clean CT"
    calibrated = load_checkpoint(checkpoint)["calibration"]["detectors"]
    assert {r["detector"] for r in rows["verdicts"]} == {f"CDM {name}" for name in calibrated}, "no baseline"
    for row in rows["verdicts"]:
        assert next(iter(row["rates"])) == "clean" and all(0 <= v <= 1 for v in row["rates"].values())
    assert "Volumes not passed at the calibrated threshold (fpr 0.05;" in out


def test_volume_checks_calibrate_the_checks_and_report_the_gate(checkpoint, tmp_path):
    draws = [make_phantoms(tmp_path / f"ood-{k}", 1, "nifti", size=16, slices=8, seed=k, ood_sets=True).parent
             for k in (1, 3)]  # fmt: skip
    calibration = make_phantoms(tmp_path / "calibration", 4, "nifti", size=16, slices=8, seed=2).parent
    block = blocks(run("volume_checks.py", "--checkpoint", checkpoint, "--calibrate", calibration, "--data",
                       *draws))["volume-checks"]  # fmt: skip
    statistics = table_rows(block, "volume-level AUROC")
    checks = ["slice-order", "slice-direction", "orientation", "anatomy", "local", "foreign"]
    assert list(statistics) == [*(f"{c} (statistic)" for c in checks), "nll (mean)", "combined (mean)"]
    assert {"truncated-fov", "partial-slab", "early-coverage", "slab-position"} <= set(cells(block.splitlines()[0]))
    assert all(0 <= number(v) <= 1 for row in statistics.values() for v in row)
    gate = table_rows(block, "gate")
    assert list(gate) == ["combined", *(f"combined + {c}" for c in checks), "combined + all (the gate)"]
    rates = {k: [number(v) for v in row] for k, row in gate.items()}
    for one in checks:
        pairs = zip(rates["combined"], rates[f"combined + {one}"], rates["combined + all (the gate)"], strict=True)
        assert all(a <= b <= c for a, b, c in pairs), "a check only ever stops more volumes"
    assert "Calibrated on 32 slices" in block and "orientation threshold" in block
    assert f"2 clean test volumes, and as many of each set, below `{draws[0]}`, `{draws[1]}`." in block, "pooled"


def test_local_anomalies_measure_each_kind_and_the_detection_limit(checkpoint, tmp_path):
    """On the tiny CT model (its 16x16 grid) with brain subjects in CT-like units: one row per kind in the main
    table with rates and AUROCs in [0, 1], the clean volumes' interval, and a detection-limit row per kind and
    contrast with a column per radius."""
    from cdm_ood.data.anatomy import brain_volume
    from cdm_ood.data.defects import LOCAL_ANOMALIES
    from cdm_ood.data.volume_files import write_nifti

    rng = np.random.default_rng(0)
    for k in range(6):
        write_nifti(brain_volume(rng, 16, 24) - 1000.0, tmp_path / "calibration" / f"s{k}.nii.gz")
    train = make_phantoms(tmp_path / "train", 2, "nifti", size=16, slices=8, seed=4)
    out = run("local_anomalies.py", "--checkpoint", checkpoint, "--calibrate", tmp_path / "calibration", "--subjects",
              2, "--train", train, "--ddpm-steps", 2, "--recon-steps", 5)  # fmt: skip
    block = blocks(out)["local-anomalies"]
    main = table_rows(block, "kind")
    assert list(main) == list(LOCAL_ANOMALIES)
    assert all(0 <= number(v) <= 1 for row in main.values() for v in row)
    assert "Clean volumes stopped: the gate" in block and "95% interval" in block
    limit = [cells(line) for line in block[block.index("| kind | contrast") :].split("\n\n")[0].splitlines()[2:]]
    contrasts = (0.1, 0.2, 0.4, 0.8)
    assert [(row[0], number(row[1])) for row in limit] == [(k, c) for k in LOCAL_ANOMALIES for c in contrasts]
    assert all(len(row) == 6 and all(0 <= number(v) <= 1 for v in row[2:]) for row in limit)
    mood = table_rows(block, "kind | CDM sample AP")
    assert list(mood) == list(LOCAL_ANOMALIES) and all(0 <= number(v) <= 1 for row in mood.values() for v in row)
    assert "DDPM baseline" in block and "trained on" in block


def test_ood_baselines_development_chooses_drift_smoothing_and_nothing_else(tmp_path):
    out = run("ood_baselines.py", "--dataset", "mnist,phantoms", "--development", "--steps", 2, "--volumes", "2,1,1",
              "--out", tmp_path / "out", "--figures", tmp_path / "img", cwd=tmp_path)  # fmt: skip
    found = re.findall(r"^(drift|combined-drift), smoothing ([\d.]+) px: (.*)$", out, flags=re.MULTILINE)
    widths = [0.0, 1.0, 1.5, 2.0, 3.0]
    assert [(name, float(w)) for name, w, _ in found] == [(n, w) for w in widths for n in ("drift", "combined-drift")]
    ranked = {}
    for name, width, text in found:
        aurocs = {a: float(v) for a, v in re.findall(r"([a-z]+) ([\d.]+)", text)}
        assert list(aurocs) == list(ARTIFACTS), "every mild artifact of the development volumes"
        if name == "combined-drift":
            ranked[float(width)] = (min(aurocs.values()), np.mean(list(aurocs.values())))
    best = float(re.search(r"best worst-case combined-drift: ([\d.]+) px", out)[1])
    assert ranked[best][0] == max(v[0] for v in ranked.values())
    assert not blocks(out) and not (tmp_path / "out").exists() and not (tmp_path / "img").exists(), "nothing else"


def test_localization_measures_every_defect(tmp_path):
    out = run("localization.py", "--steps", 2, "--volumes", "2,1,1", "--figures", tmp_path / "img", "--out",
              tmp_path / "out", "--no-tracking", "--development")  # fmt: skip
    rows = json.loads((tmp_path / "out" / "phantoms.json").read_text())
    assert [r["defect"] for r in rows] == ["metal-streak", "lesion", "foreign-object", "local-ghost"]
    assert all(0 <= r["peak_in_mask"] <= 1 and r["slices"] > 0 for r in rows)
    assert all(r["pixel_auroc"] > 0.6 for r in rows), "even a barely trained map is higher on the defects' pixels"
    assert "| defect | slices | pixel AUROC | pixel AUROC unsmoothed | pixel AUROC per-pixel z |" in out
    assert "| local-ghost |" in out
    assert (tmp_path / "img" / "localization-phantoms.png").stat().st_size > 1000
    candidates = re.findall(r"(pooled|per-pixel) z, smoothing ([\d.]+) px: mean pixel AUROC ([\d.]+)", out)
    widths = [0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0]  # --development
    assert [(k, float(w)) for k, w, _ in candidates] == [(k, w) for k in ("pooled", "per-pixel") for w in widths]
    means = {(k, float(w)): float(m) for k, w, m in candidates}
    best = re.search(r"best: (pooled|per-pixel) z, ([\d.]+) px\n", out)
    assert means[best[1], float(best[2])] == max(means.values()), "the printed choice has the best mean on the set"


def test_train_time_reads_the_run_it_leaves(tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["--config", "digits-cpu", "--steps", 3, "--set", "train.val_every=2", "--set", "train.val_samples=32"]
    out = run("train_time.py", "--out-dir", run_dir, *tiny, "--no-mlflow")
    rows = table_rows(blocks(out)["train-time"], "config")
    ((config, (steps, per_step, wall, bpd, peak)),) = rows.items()
    assert config.startswith("`digits-cpu` (batch 32, 8x8, UNet (16, 32, 32)") and steps == "3"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [f"{r['step']}: {r['val_bpd']:.2f}" for r in records if "val_bpd" in r]
    assert len(validations) == 2 and bpd == f"{validations[-1].split(': ')[1]} ({validations[0]})"
    assert 0 < number(per_step) < number(wall) and 0.1 < number(peak) < 4, "seconds; GiB of a torch process"
    assert (run_dir / "model.pt").is_file(), "the trained model stays for the next evidence steps"
    again = warm_run(str(BENCHMARKS / "train_time.py"), ["--out-dir", run_dir], Path.cwd(), clean_env())
    assert again.returncode != 0 and "--replace" in again.stderr and (run_dir / "model.pt").is_file()


def test_architectures_compare_both_classifiers_at_one_budget(tmp_path):
    out = run("architectures.py", "--dataset", "phantoms", "--steps", 2, "--volumes", "2,1,1", "--sample-steps", 2,
              "--figures", tmp_path / "img", "--no-tracking")  # fmt: skip
    rows = table_rows(blocks(out)["architectures"], "classifier")
    assert list(rows) == ["`unet`", "`encoder`"]
    params = {arch: number(rows[f"`{arch}`"][0]) for arch in ("unet", "encoder")}
    assert params["encoder"] < params["unet"] / 2, "the encoder-only classifier has no decoder"
    for arch, cells in rows.items():
        per_set = [float(c) for c in cells[4:-3]]
        assert len(per_set) == 6 and all(0 <= a <= 1 for a in per_set), "one AUROC per mild phantom artifact"
        assert number(cells[-3]) == pytest.approx(np.mean(per_set), abs=6e-4), "the mean of its own row"
        assert 0 < number(cells[2]) < 20, "bits/dim of 11-bit images"
        assert (tmp_path / "img" / f"architectures-phantoms-{arch.strip('`')}.png").stat().st_size > 100


def test_clopper_pearson_has_its_closed_form_at_the_ends():
    """None of n: [0, 1 - 0.025^(1/n)]; all of n: [0.025^(1/n), 1]; otherwise inside (0, 1) around k / n."""
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    lo, hi = clopper_pearson(2, 24)
    assert 0 < lo < 2 / 24 < hi < 1
