"""MLflow as its users expect: runs end FINISHED, FAILED or KILLED; a resumed training continues its run; score and
evaluate runs link to the training run and log the calibrated thresholds. Real `cdm-ood` processes and a real
SQLite store."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIG, TINY_CT
from mlflow.tracking import MlflowClient
from processes import cdm
from test_score import invoke

from cdm_ood.integrations.tracking import TRAINING_RUN_TAG, MlflowCallback, RunFolderCallback
from cdm_ood.jobs.config import load_config
from cdm_ood.jobs.training import latest_checkpoint, train
from cdm_ood.jobs.validation import calibrate_on_validation
from cdm_ood.model.checkpoint import RUN_ID, CheckpointError, load_checkpoint, load_model, save_checkpoint
from cdm_ood.ood.calibration import DEFAULT_DETECTOR


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one takes seconds); each test tracks into its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def train_args(root: Path, store: str, experiment: str, *overrides: str) -> list:
    """`cdm-ood train` of the tiny CT-phantom model into `root/run`, tracked in `store` under `experiment`."""
    sets = [f"data.root={root / 'phantoms'}", *TINY_CT, "train.log_every=2", f"tracking.experiment={experiment}",
            *overrides]  # fmt: skip
    return ["train", "--config", CONFIG, "--out-dir", root / "run", "--mlflow", "--tracking-uri", store,
            *[a for o in sets for a in ("--set", o)]]  # fmt: skip


def only_run(store: str, experiment: str):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps(store: str, run_id: str, metric: str) -> list[int]:
    return [m.step for m in MlflowClient(store).get_metric_history(run_id, metric)]


def test_sigterm_ends_the_run_killed_and_resume_continues_the_same_run(store, tmp_path):
    args = train_args(tmp_path, store, "killed", "train.steps=100000", "train.checkpoint_every=2")
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cdm_ood.cli", *map(str, args)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "checkpoints" / "step_0000002.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "the shell's exit status for SIGTERM"
    killed = only_run(store, "killed")
    assert killed.info.status == "KILLED"
    assert "cdm-ood train --resume" in (tmp_path / "stderr.log").read_text()
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))[RUN_ID] == killed.info.run_id

    resumed = cdm("train", "--resume", tmp_path / "run", "--set", "train.steps=12", "--mlflow", "--tracking-uri", store,
                  cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = only_run(store, "killed")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert sorted(set(steps(store, run.info.run_id, "loss"))) == list(range(2, 13, 2))
    assert steps(store, run.info.run_id, "val_bpd")[-1] == 12
    assert run.data.params["train.steps"] == "100000", "params keep their first values (MLflow params are fixed)"
    assert load_checkpoint(tmp_path / "run" / "model.pt")[RUN_ID] == run.info.run_id
    assert "model" in {m.name for m in MlflowClient(store).search_logged_models([run.info.experiment_id])}


def test_an_exception_during_training_ends_the_run_failed(store, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoint folder goes: saving fails")
    out = cdm(*train_args(tmp_path, store, "failed", "train.steps=4", "train.checkpoint_every=2"), cwd=tmp_path)
    assert out.returncode == 3 and "error: FileExistsError" in out.stderr and "Traceback" not in out.stderr
    run = only_run(store, "failed")
    assert run.info.status == "FAILED" and steps(store, run.info.run_id, "loss") == [2]


def test_ctrl_c_ends_the_run_killed(store, tmp_path):
    class CtrlC(RunFolderCallback):
        def on_step(self, step: int, metrics: dict) -> None:
            raise KeyboardInterrupt

    config = load_config(CONFIG, [f"data.root={tmp_path / 'phantoms'}", *TINY_CT, "train.steps=8"])
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", callbacks=[MlflowCallback(store, "ctrl-c", None), CtrlC(tmp_path / "run")])
    assert only_run(store, "ctrl-c").info.status == "KILLED"


def test_a_run_id_the_store_does_not_know_starts_a_new_run(store, tmp_path, caplog):
    config = load_config(CONFIG, [f"data.root={tmp_path / 'phantoms'}", *TINY_CT, "train.steps=2"])
    tracker = MlflowCallback(store, "unknown", None, run_id="f" * 32)  # e.g. a checkpoint tracked elsewhere
    train(config, tmp_path / "run", callbacks=[tracker])
    run = only_run(store, "unknown")
    assert run.info.run_id == tracker.run_id != "f" * 32 and run.info.status == "FINISHED"
    assert f"MLflow run {'f' * 32} of the resumed checkpoint is not in {store}" in caplog.text


@pytest.fixture(scope="module")
def tracked(store, tmp_path_factory) -> tuple[Path, str, str]:
    """A tiny model trained and tracked by `train` with `MlflowCallback`: (model.pt, store, training run id)."""
    root = tmp_path_factory.mktemp("tracked")
    config = load_config(CONFIG, [f"data.root={root / 'phantoms'}", *TINY_CT, "train.steps=8"])
    tracker = MlflowCallback(store, "cdm-ood", None)
    callbacks = [RunFolderCallback(root / "run"), tracker]
    return train(config, root / "run", callbacks=callbacks, finish=[calibrate_on_validation]), store, tracker.run_id


def test_score_and_evaluate_runs_link_to_the_training_run_and_log_thresholds(tracked, scans, tmp_path):
    checkpoint, store, training_run = tracked
    client = MlflowClient(store)
    out = invoke("score", scans / "clean.nii.gz", scans / "spiked.nii.gz", "--checkpoint", checkpoint, "--out",
                 tmp_path / "r.json", "--no-fail", "--mlflow", "--tracking-uri", store, "--html",
                 tmp_path / "page.html")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert training_run in (tmp_path / "page.html").read_text(), "the page names the model's training run"
    threshold = json.loads((tmp_path / "r.json").read_text())["threshold"]
    scored = only_run(store, "cdm-ood-score")
    assert scored.data.tags[TRAINING_RUN_TAG] == training_run
    assert scored.data.metrics["threshold"] == pytest.approx(threshold)
    assert scored.data.metrics[f"calibration.{DEFAULT_DETECTOR}.threshold"] == pytest.approx(threshold), "auto"
    assert scored.data.metrics["calibration.fpr"] == pytest.approx(0.05)
    assert {a.path for a in client.list_artifacts(scored.info.run_id)} == {"r.json", "r_hist.png", "page.html"}

    out = invoke("evaluate", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--ood",
                 f"spike={scans / 'spiked.nii.gz'}", "--out-dir", tmp_path / "eval", "--mlflow", "--tracking-uri",
                 store)  # fmt: skip
    assert out.exit_code == 0, out.output
    evaluated = only_run(store, "cdm-ood-evaluate")
    assert evaluated.data.tags[TRAINING_RUN_TAG] == training_run
    metrics = evaluated.data.metrics
    assert {"nll.spike.auroc", "multiscale.spike.fpr95", "calibration.multiscale.threshold"} <= set(metrics)
    assert metrics[f"calibration.{DEFAULT_DETECTOR}.threshold"] == pytest.approx(threshold)
    artifacts = {a.path for a in client.list_artifacts(evaluated.info.run_id)}
    assert {"metrics.csv", "metrics.json", "roc_nll.png", "hist_nll.png", "hist_multiscale.png", "report.html"} <= (
        artifacts
    )


def test_the_run_id_is_an_optional_checkpoint_entry(checkpoint, tracked, tmp_path):
    path, _, training_run = tracked
    assert RUN_ID not in load_checkpoint(checkpoint) and load_model(checkpoint).training_run_id is None
    assert load_model(path).training_run_id == training_run
    save_checkpoint(tmp_path / "odd.pt", load_checkpoint(path) | {RUN_ID: 7})
    with pytest.raises(CheckpointError, match="mlflow_run_id must be a string"):
        load_model(tmp_path / "odd.pt")
