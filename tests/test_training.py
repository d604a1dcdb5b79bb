"""Training: real runs of a tiny model on the bundled digits, in-process and as real (torchrun) processes."""

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from processes import cdm, clean_env, warm_run

from cdm_ood.data.natural import sklearn_digits
from cdm_ood.integrations.serving import score_array
from cdm_ood.integrations.tracking import RunFolderCallback
from cdm_ood.jobs.config import load_config
from cdm_ood.jobs.training import lr_factor, train
from cdm_ood.model.checkpoint import load_checkpoint, load_model
from cdm_ood.ood import OODDetector

TINY = [
    "model.channels=[8, 16]",
    "model.attention_levels=[false, true]",
    "model.num_head_channels=8",
    "schedule.T=10",
    "train.batch_size=16",
    "train.threads=1",
    "optim.warmup_steps=5",
    "train.val_samples=32",
]
CONFIG = Path(__file__).parent.parent / "configs" / "digits-cpu.yaml"


def tiny(*overrides: str):
    return load_config(CONFIG, [*TINY, *overrides])


def cli(*args: str, cwd: Path, runner=(), config=CONFIG, check=True, env=None) -> subprocess.CompletedProcess:
    """`cdm-ood train` as a real process (forked warm unless `runner`, e.g. torchrun, runs it), without any MLflow
    settings of the calling environment (so tracked by default; plus `env`)."""
    env = {k: v for k, v in clean_env(env).items() if k != "CDM_OOD_MLFLOW" or k in (env or {})}
    train_args = ["train", *(["--config", str(config)] if config else []), *args]
    if runner:
        command = [sys.executable, *runner, "-m", "cdm_ood.cli", *train_args]
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    else:
        out = warm_run("cdm_ood.cli", train_args, cwd, env)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def sets(*overrides: str) -> list[str]:
    return [arg for o in [*TINY, *overrides] for arg in ("--set", o)]


def metrics(run: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    return records


def test_warm_up_then_step_decay():
    f = lr_factor(warmup_steps=4, decay_every=10, decay_factor=0.1)
    assert [round(f(k), 6) for k in (0, 1, 3, 9, 10, 25)] == [0.25, 0.5, 1.0, 1.0, 0.1, 0.01]


def test_a_run_writes_checkpoints_metrics_and_a_loadable_model(tmp_path):
    config = tiny("train.steps=6", "train.checkpoint_every=2", "train.keep_last=2", "train.log_every=1",
                  "train.val_every=3")  # fmt: skip
    run = tmp_path / "run"
    model_path = train(config, run, callbacks=[RunFolderCallback(run)])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004.pt", "step_0000006.pt"]
    records = metrics(run)
    assert sorted(records) == [1, 2, 3, 4, 5, 6] and "val_bpd" in records[3] and "val_bpd" in records[6]
    assert all(np.isfinite(r["loss"]) for r in records.values())
    assert load_config(run / "config.yaml") == config
    full = load_checkpoint(run / "checkpoints" / "step_0000006.pt")
    assert {"model", "ema", "optimizer", "scheduler", "rng"} <= set(full) and full["step"] == 6
    assert "optimizer" not in load_checkpoint(model_path)
    loaded = load_model(model_path)
    assert loaded.spec.preset.name == "uint8" and loaded.spec.size == (8, 8) and loaded.schedule.T == 10
    raw = {k: v for k, v in full["model"].items()}
    ema = loaded.classifier.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in ema), "the scoring model is the EMA, not the raw weights"


def test_training_is_deterministic_for_a_seed(tmp_path):
    a = load_checkpoint(train(tiny("train.steps=3"), tmp_path / "a"))["ema"]
    b = load_checkpoint(train(tiny("train.steps=3"), tmp_path / "b"))["ema"]
    c = load_checkpoint(train(tiny("train.steps=3", "train.seed=1"), tmp_path / "c"))["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_bf16_training_steps_differ_from_float32_ones_by_rounding_only(tmp_path):
    full = load_checkpoint(train(tiny("train.steps=2"), tmp_path / "f32"))["ema"]
    half = load_checkpoint(train(tiny("train.steps=2", "train.precision=bf16"), tmp_path / "bf16"))["ema"]
    moved = [k for k in full if full[k].is_floating_point() and not torch.equal(full[k], half[k])]
    assert moved, "the bf16 run computes its steps in another precision"
    assert all(torch.allclose(full[k], half[k], rtol=0.05, atol=1e-3) for k in full if full[k].is_floating_point())


def test_class_conditional_training_with_label_dropout(tmp_path):
    path = train(tiny("train.steps=3", "model.num_classes=10", "loss.label_dropout=0.5"), tmp_path / "cond")
    model = load_model(path).classifier
    assert model.null_label == 10 and model.backbone.class_embedding.num_embeddings == 11
    x = torch.zeros(2, 1, 8, 8)
    assert model(x, torch.tensor([3, 3])).shape == (2, 12)


def test_3d_volume_training(tmp_path):
    config = load_config(
        CONFIG.with_name("phantoms-ct-3d.yaml"),
        [
            f"data.root={tmp_path / 'ph'}", "data.phantoms={n: 4, size: 16, slices: 8}", "data.size=[8, 16, 16]",
            "model.channels=[8, 8]", "model.attention_levels=[false, false]", "model.num_head_channels=8",
            "schedule.T=10", "train.steps=2", "train.batch_size=2", "train.threads=1",
        ],
    )  # fmt: skip
    loaded = load_model(train(config, tmp_path / "run3d"))
    assert loaded.spec.size == (8, 16, 16) and loaded.classifier(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 12)
    assert (tmp_path / "run3d" / "split_manifest.csv").exists()


def test_resume_after_sigkill_continues_exactly(tmp_path):
    steps = "train.steps=60"
    cli("--out-dir", str(tmp_path / "ref"), "--no-mlflow", *sets(steps, "train.log_every=1"), cwd=tmp_path)
    reference = metrics(tmp_path / "ref")

    run = tmp_path / "killed"
    args = ["--out-dir", str(run), "--no-mlflow", *sets(steps, "train.log_every=1", "train.checkpoint_every=10",
                                                      "train.keep_last=50")]  # fmt: skip
    env = clean_env()
    command = [sys.executable, "-m", "cdm_ood.cli", "train", "--config", str(CONFIG), *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_0000030.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "model.pt").exists(), "the run was killed before it finished"
    killed_at = max(metrics(run))
    cli("--resume", str(run), "--no-mlflow", cwd=tmp_path, config=None)
    resumed = metrics(run)
    last_checkpoint = max(s for s in range(10, 61, 10) if s <= killed_at)
    assert last_checkpoint >= 30 and last_checkpoint < 60
    for step in range(last_checkpoint + 1, 61):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step} differs after resume"
    final_ref = load_checkpoint(tmp_path / "ref" / "model.pt")["ema"]
    final = load_checkpoint(run / "model.pt")["ema"]
    assert all(torch.equal(final_ref[k], final[k]) for k in final_ref)


def test_resuming_from_a_model_only_checkpoint_is_refused_with_what_to_resume_from(tmp_path):
    run = tmp_path / "run"
    cli("--out-dir", str(run), "--no-mlflow", *sets("train.steps=2"), cwd=tmp_path)
    out = cli("--resume", str(run / "model.pt"), "--no-mlflow", cwd=tmp_path, config=None, check=False)
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
        f"error: {run / 'model.pt'}: not a full training checkpoint (no model, optimizer, scheduler, rng): resume "
        "from a run folder or one of its checkpoints/step_*.pt")  # fmt: skip


def test_two_torchrun_processes_equal_one_process_on_the_combined_batch(tmp_path):
    common = ["--no-mlflow", *sets("train.steps=4", "train.checkpoint_every=4")]
    single = cli("--out-dir", str(tmp_path / "one"), *common, "--set", "train.batch_size=16", cwd=tmp_path)
    double = cli(
        "--out-dir", str(tmp_path / "two"), *common, "--set", "train.batch_size=8", cwd=tmp_path,
        runner=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )  # fmt: skip
    assert "global batch 16 (16 per process x 1)" in single.stderr
    assert "global batch 16 (8 per process x 2)" in double.stderr
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_0000004.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "step_0000004.pt")["model"]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()), "only rank 0 writes"
    for key in one:  # Adam turns float noise in near-zero gradients into steps of up to ~lr x 1e-2
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)


def test_mlflow_run_in_the_default_sqlite_store_and_model_by_run_id(tmp_path):
    """The encoder-only classifier (the UNet one is the shared fixture of every scoring test, and of
    tests/test_serving.py's pyfunc model) trains through `cdm-ood train`, round-trips through its checkpoint and the
    MLflow pyfunc model, and scores through `cdm-ood score` with the scores of the Python API."""
    arch = "encoder"
    no_git = {"PATH": str(Path(sys.executable).parent)}  # MLflow looks for git: a machine without it
    steps = sets("train.steps=4", "train.log_every=2", f"model.arch={arch}")
    out = cli("--out-dir", str(tmp_path / "run"), *steps, cwd=tmp_path, env=no_git)
    noise = [line for line in out.stderr.splitlines() if not re.match(r"\d\d:\d\d:\d\d INFO ", line)]
    assert noise == [], "only cdm-ood's own log lines: no MLflow/alembic INFO lines, warnings or git messages"
    assert (tmp_path / "mlflow.db").exists(), "the default store is sqlite:///mlflow.db in the working directory"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cdm-ood").experiment_id])
    assert run.data.params["schedule.T"] == "10" and run.data.params["model.channels"] == "[8, 16]"
    assert run.data.params["run.global_batch"] == "16" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bpd")] == [4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/model.pt"]

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = np.stack([s["image"] for s in sklearn_digits("test")[:5]])
    predicted = pyfunc.predict(images)
    model = load_model(tmp_path / "run" / "model.pt")
    x = torch.from_numpy(images / 127.5 - 1).float()  # the uint8 preset; the digits are the model's 8x8
    with torch.no_grad():
        logits = model.classifier(x).double()
    d = x[0].numel()  # eq. 10 by hand: log p_0(x) = F_0(x) - F_{T+1}(x) + log N(x; 0, I)
    log_normal = -0.5 * d * math.log(2 * math.pi) - 0.5 * x.double().flatten(1).square().sum(1)
    log_p0 = logits[:, 0] - logits[:, -1] + log_normal
    np.testing.assert_allclose(predicted["log_likelihood"], log_p0.numpy(), rtol=1e-5)
    np.testing.assert_allclose(predicted["bits_per_dim"], -log_p0.numpy() / (d * math.log(2)) + 7, rtol=1e-5)
    fit = model.calibration.detectors[model.calibration.default]
    held_out = np.sort(fit.id_scores)  # the threshold: the k-th largest held-out score, k = floor(fpr n)
    threshold = held_out[len(held_out) - math.floor(model.calibration.fpr * len(held_out)) - 1]
    assert (predicted["threshold"] == threshold).all()
    assert list(predicted["ood"]) == [v != "in" for v in predicted["verdict"]] == list(predicted["score"] > threshold)
    assert model.classifier.arch == arch and run.data.params["model.arch"] == arch
    expected = score_array(OODDetector.from_checkpoint(tmp_path / "run" / "model.pt"), images)
    np.testing.assert_allclose(predicted["score"], expected["score"], rtol=1e-6)

    (tmp_path / "digits").mkdir()
    pixels = images.round().astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0]).save(tmp_path / "digits" / f"{i}.png")
    report = tmp_path / "report.json"
    scored = cdm("score", tmp_path / "digits", "--checkpoint", tmp_path / "run" / "model.pt", "--threshold", "1e12",
                 "--out", report, cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = sorted((r for r in json.loads(report.read_text())["rows"] if r["level"] == "slice"), key=lambda r: r["path"])
    expected = score_array(OODDetector.from_checkpoint(tmp_path / "run" / "model.pt"), pixels)
    np.testing.assert_allclose([r["score"] for r in rows], expected["score"], rtol=1e-5)


def test_unreachable_tracking_server_is_tolerated(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = cli("--out-dir", str(tmp_path / "run"), "--tracking-uri", f"http://127.0.0.1:{port}",
              *sets("train.steps=3"), cwd=tmp_path)  # fmt: skip
    assert out.stderr.count("MLflow tracking at") == 1
    assert (tmp_path / "run" / "model.pt").exists() and "checkpoint:" in out.stdout


@pytest.mark.parametrize("bad", ["--set=train.stepz=1", "--config=does-not-exist.yaml",
                                 "--set=train.steps=!!python/object/apply:os.system ['touch pwned']",
                                 "--set=train.steps=[1,", "--set=train"])  # fmt: skip
def test_bad_configs_fail_before_any_work(tmp_path, bad):
    out = subprocess.run([sys.executable, "-m", "cdm_ood.cli", "train", bad], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error:") and len(out.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [], "nothing written, no code from the value run"


def test_a_data_root_without_scans_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["--config", "phantoms-ct", "--out-dir", "run", "--set", f"data.root={tmp_path / 'empty'}", "--set",
            "data.phantoms=null", "--set", "tracking.enabled=false"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "cdm_ood.cli", "train", *args], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == (f"error: {tmp_path / 'empty'}: no readable scans to train on (set data.root "
                                           "to a folder of DICOM/NIfTI scans)")  # fmt: skip
