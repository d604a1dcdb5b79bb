"""The detector as an MLflow pyfunc model, registered: in-process predictions on images of any size, its
requirements, and a real `mlflow models serve` REST server."""

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
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_score import invoke

from cdm_ood.data import iter_slices
from cdm_ood.data.phantoms import phantom_volume, write_nifti

NAME = "cdm-ood-ct"


@pytest.fixture(scope="module")
def model_uri(checkpoint, tmp_path_factory) -> tuple[str, str]:
    """`cdm-ood log-model --registered-model-name`: the registry's URI of the new version, and the store."""
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    out = invoke("log-model", "--checkpoint", checkpoint, "--tracking-uri", store, "--registered-model-name", NAME)
    assert out.exit_code == 0, out.output
    return out.stdout.strip().splitlines()[-1], store


@pytest.fixture(scope="module")
def sized(tmp_path_factory) -> dict[int, Path]:
    """CT phantom volumes of 2 slices, 40x40 (larger than the 16x16 model) and 16x16."""
    folder, rng = tmp_path_factory.mktemp("sized"), np.random.default_rng(11)
    paths = {size: folder / f"ct{size}.nii.gz" for size in (40, 16)}
    for size, path in paths.items():
        write_nifti(phantom_volume(rng, size=size, slices=2), path)
    return paths


def cli_scores(checkpoint: Path, path: Path, tmp_path: Path) -> np.ndarray:
    invoke("score", path, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--no-fail")
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    return np.array([r["score"] for r in rows if r["level"] == "slice"])


def test_log_model_registers_a_version(model_uri):
    uri, store = model_uri
    assert uri == f"models:/{NAME}/1"
    version = MlflowClient(store).get_model_version(NAME, "1")
    assert version.status == "READY" and version.run_id


def test_pyfunc_model_gives_the_scores_of_cdm_ood_score(model_uri, checkpoint, scans, tmp_path):
    uri, store = model_uri
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


def test_pyfunc_model_takes_any_size_the_cli_takes(model_uri, checkpoint, sized, tmp_path):
    uri, store = model_uri
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(uri)
    expected = {size: cli_scores(checkpoint, path, tmp_path) for size, path in sized.items()}
    images = {size: np.stack([s.image for s in iter_slices(path)]) for size, path in sized.items()}
    for size in sized:  # (B, C, H, W) float32 as read, and (B, H, W) float64
        np.testing.assert_allclose(model.predict(images[size])["score"], expected[size], rtol=1e-5)
        np.testing.assert_allclose(model.predict(images[size][:, 0].astype(np.float64))["score"], expected[size],
                                   rtol=1e-5)  # fmt: skip
    frame = pd.DataFrame({"image": [image[0].tolist() for size in sized for image in images[size]]})
    predicted = model.predict(frame)  # one image per row, sizes mixed, as JSON `dataframe_records` arrive
    np.testing.assert_allclose(predicted["score"], np.concatenate([expected[40], expected[16]]), rtol=1e-5)


def test_logged_requirements_install_elsewhere(model_uri):
    uri, store = model_uri
    mlflow.set_tracking_uri(store)
    lines = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read_text().splitlines()
    pins = dict(line.split("==") for line in lines)
    assert {"torch", "monai", "numpy", "pandas", "mlflow"} <= set(pins)
    assert not [line for line in lines if "+" in line], "no local version label such as +cpu"
    assert pins["torch"] == torch.__version__.split("+")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_scores_over_rest(model_uri, checkpoint, scans, sized, tmp_path):
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
        rows = [[s.image[0].tolist()] for s in iter_slices(sized[40])] + [[images[0, 0].tolist()]]  # 40x40, 16x16
        split = {"dataframe_split": {"columns": ["image"], "data": rows}}
        scores = np.array([p["score"] for p in post(f"http://127.0.0.1:{port}/invocations", split)["predictions"]])
        expected = np.concatenate([cli_scores(checkpoint, sized[40], tmp_path), expected[:1]])
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
