"""The detector as an MLflow pyfunc model: in-process predictions and a real `mlflow models serve` REST server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_score import invoke

from cdm_ood.data import iter_slices


@pytest.fixture(scope="module")
def model_uri(checkpoint, tmp_path_factory) -> tuple[str, str]:
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    out = invoke("log-model", "--checkpoint", checkpoint, "--tracking-uri", store)
    assert out.exit_code == 0, out.output
    return out.stdout.strip().splitlines()[-1], store


def cli_scores(checkpoint: Path, path: Path, tmp_path: Path) -> np.ndarray:
    invoke("score", path, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--no-fail")
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    return np.array([r["score"] for r in rows if r["level"] == "slice"])


def test_pyfunc_model_gives_the_scores_of_cdm_ood_score(model_uri, checkpoint, scans, tmp_path):
    uri, store = model_uri
    assert uri.startswith("runs:/") and uri.endswith("/model")
    mlflow.set_tracking_uri(store)
    images = np.stack([s.image for s in iter_slices(scans / "spiked.nii.gz")])
    model = mlflow.pyfunc.load_model(uri)
    predicted = model.predict(images)
    assert list(predicted.columns) == ["score", "ood", "verdict", "reason", "threshold", "log_likelihood",
                                       "bits_per_dim"]  # fmt: skip
    expected = cli_scores(checkpoint, scans / "spiked.nii.gz", tmp_path)
    np.testing.assert_allclose(predicted["score"], expected, rtol=1e-5)
    assert (predicted["ood"] == (predicted["score"] > predicted["threshold"])).all()
    bad = np.stack([np.full_like(images[0], np.nan), images[0], images[0]])
    bad[1, 0, 3, 3], bad[2] = np.inf, 5.0  # one inf pixel; a constant image
    flagged = model.predict(bad)
    assert list(flagged["verdict"]) == ["flagged"] * 3 and flagged["ood"].all() and flagged["score"].isna().all()
    assert list(flagged["reason"]) == ["not scored: nan-or-inf pixels"] * 2 + ["not scored: constant pixels"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_scores_over_rest(model_uri, checkpoint, scans, tmp_path):
    uri, store = model_uri
    port = free_port()
    # mlflow starts `uvicorn` by name: the environment's bin folder must be on PATH (as in an activated venv)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "PATH": path}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()[-3000:]
                time.sleep(0.5)
        images = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")])
        batch = np.concatenate([images] * 4)  # 16 slices
        start = time.perf_counter()
        answer = post(f"http://127.0.0.1:{port}/invocations", {"inputs": batch.tolist()})
        print(f"REST round trip, 16 slices: {time.perf_counter() - start:.3f} s")
        scores = np.array([p["score"] for p in answer["predictions"]])
        expected = cli_scores(checkpoint, scans / "clean.nii.gz", tmp_path)
        np.testing.assert_allclose(scores, np.concatenate([expected] * 4), rtol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
