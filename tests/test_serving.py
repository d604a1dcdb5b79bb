"""The detector as an MLflow pyfunc model, registered: in-process predictions on images of any size, its
requirements, a real `mlflow models serve` REST server, and `cdm-ood serve` under requests that are too large,
abandoned or cut short by SIGTERM."""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from processes import free_port
from test_score import invoke

from cdm_ood.data import iter_slices
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_nifti
from cdm_ood.errors import UsageError
from cdm_ood.integrations.cancellation import AbandonedRequestError
from cdm_ood.integrations.serving import predict
from cdm_ood.ood import OODDetector

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


def test_a_volume_request_reports_what_it_cannot_score_as_cdm_ood_score_does(checkpoint, scans):
    detector = OODDetector.from_checkpoint(checkpoint)
    stack = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")], axis=1)
    stack[0, 1, 2, 2] = np.nan
    rows = predict(detector, pd.DataFrame({"file": [b"not an image", None], "volume": [None, stack]}))
    assert rows[["level", "path", "verdict"]].values.tolist()[0] == ["file", "volume-0.nii", "unreadable"]
    assert rows.reason[0] == "NotAnImageError: text file, not an image"
    volume = rows[(rows.level == "volume") & (rows.path == "volume-1")]
    assert volume.verdict.tolist() == ["flagged"] and "nan-or-inf" in volume.reason.iloc[0]
    with pytest.raises(UsageError, match="volume-0: the 'file' column holds a file's bytes as base64 text"):
        predict(detector, pd.DataFrame({"file": ["not base64!"]}))
    with pytest.raises(UsageError, match=r"volume-0: a volume is a stack \(D, H, W\)"):
        predict(detector, pd.DataFrame({"volume": [[1.0, 2.0]]}))


def test_logged_requirements_install_elsewhere(model_uri):
    uri, store = model_uri
    mlflow.set_tracking_uri(store)
    lines = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read_text().splitlines()
    pins = dict(line.split("==") for line in lines)
    assert {"torch", "monai", "numpy", "pandas", "mlflow"} <= set(pins)
    assert not [line for line in lines if "+" in line], "no local version label such as +cpu"
    assert pins["torch"] == torch.__version__.split("+")[0]


class Server:
    """A REST server process (its own session) on a free local port, its output in a file; ready once /ping
    answers."""

    def __init__(self, command: list[str], store: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        # mlflow starts `uvicorn` by name: the environment's bin folder must be on PATH (as in an activated venv)
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=os.environ | {"MLFLOW_TRACKING_URI": store, "PATH": path} | (env or {}),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/ping", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None and time.time() < deadline, self.output()[-3000:]
                time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def flagged_images(images: np.ndarray) -> np.ndarray:
    """An image with a NaN pixel, one with an inf pixel, a constant one and a clean one, from clean slices."""
    bad = np.stack([images[0], images[0], np.full_like(images[0], 5.0), images[1]])
    bad[0, 0, 3, 3], bad[1, 0, 2, 2] = np.nan, np.inf
    return bad


def assert_flagged(predictions: list[dict]) -> None:
    assert [p["verdict"] for p in predictions[:3]] == ["flagged"] * 3 and predictions[3]["verdict"] != "flagged"
    assert [p["reason"] for p in predictions[:3]] == ["not scored: nan-or-inf pixels"] * 2 + [
        "not scored: constant pixels"]  # fmt: skip
    assert all(p["ood"] and p["score"] != p["score"] for p in predictions[:3])  # NaN scores


def test_mlflow_models_serve_scores_over_rest(model_uri, checkpoint, scans, sized, tmp_path):
    uri, store = model_uri
    server = Server([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                     "--workers", "1"], store, tmp_path / "server.log")  # fmt: skip
    try:
        images = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")])
        batch = np.concatenate([images] * 4)  # 16 slices
        start = time.perf_counter()
        answer = post(f"{server.url}/invocations", {"inputs": batch.tolist()})
        print(f"REST round trip, 16 slices: {time.perf_counter() - start:.3f} s")
        scores = np.array([p["score"] for p in answer["predictions"]])
        expected = cli_scores(checkpoint, scans / "clean.nii.gz", tmp_path)
        np.testing.assert_allclose(scores, np.concatenate([expected] * 4), rtol=1e-5)
        rows = [[s.image[0].tolist()] for s in iter_slices(sized[40])] + [[images[0, 0].tolist()]]  # 40x40, 16x16
        split = {"dataframe_split": {"columns": ["image"], "data": rows}}
        scores = np.array([p["score"] for p in post(f"{server.url}/invocations", split)["predictions"]])
        expected = np.concatenate([cli_scores(checkpoint, sized[40], tmp_path), expected[:1]])
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        assert_flagged(post(f"{server.url}/invocations", {"inputs": flagged_images(images).tolist()})["predictions"])
        invoke("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--out", tmp_path / "v.json", "--no-fail")
        (cli,) = [r for r in json.loads((tmp_path / "v.json").read_text())["rows"] if r["level"] == "volume"]
        content = base64.b64encode((scans / "clean.nii.gz").read_bytes()).decode()
        stack = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")], axis=1).tolist()
        for column, cell, name in (("file", content, "volume-0.nii.gz"), ("volume", stack, "volume-0")):
            request = {"dataframe_split": {"columns": [column], "data": [[cell]]}}  # a whole volume per request row
            (served,) = [p for p in post(f"{server.url}/invocations", request)["predictions"] if p["level"] == "volume"]
            assert (served["path"], served["verdict"], served["reason"]) == (name, cli["verdict"], cli["reason"])
            assert served["score"] == pytest.approx(cli["score"], rel=1e-5)
    finally:
        server.stop()


def test_served_model_stops_at_mlflows_request_timeout(model_uri, scans, monkeypatch):
    """Under `mlflow models serve` (MLflow's serving flag and its request timeout in the environment) the model
    gives up a request at the first batch past the timeout; in-process use has no time limit."""
    uri, store = model_uri
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(uri)
    images = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")])
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0")
    assert len(model.predict(np.concatenate([images] * 20))) == 80
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    start = time.perf_counter()
    with pytest.raises(AbandonedRequestError, match=r"time limit passed\): scoring stopped after") as stopped:
        model.predict(np.concatenate([images] * 7500))  # 30000 slices: far more than a second of scoring
    done = int(re.search(r"after (\d+) of 30000", str(stopped.value))[1])
    print(f"stopped after {time.perf_counter() - start:.2f} s, {done} of 30000 slices scored")
    assert 0 < done < 30000


MAX_MB = 12  # the limit of `serve` below, given by its environment variable


@pytest.fixture(scope="module")
def serve(model_uri, tmp_path_factory) -> Iterator[Callable[[], Server]]:
    """`cdm-ood serve` of the registered model, $CDM_OOD_MAX_REQUEST_MB=12 and --shutdown-timeout 1: started on
    first use, kept for the module's tests, started again after a test stopped it."""
    uri, store = model_uri
    servers: list[Server] = []

    def server() -> Server:
        if not servers or servers[-1].process.poll() is not None:
            log = tmp_path_factory.mktemp("serve") / "server.log"
            servers.append(Server([sys.executable, "-m", "cdm_ood.cli", "serve", uri, "--shutdown-timeout", "1"],
                                  store, log, {"CDM_OOD_MAX_REQUEST_MB": str(MAX_MB)}))  # fmt: skip
        return servers[-1]

    yield server
    for s in servers:
        s.stop()


def test_serve_refuses_what_is_not_a_model(tmp_path):
    out = invoke("serve", tmp_path, "--port", free_port())
    assert out.exit_code == 2 and "cannot serve" in out.output


def slow_body(n: int = 4000) -> bytes:
    """A request of `n` 4x4 images (0.4 MB, parsed at once): each is resized to the model's size and scored, seconds
    of scoring in all."""
    image = json.dumps(np.round(np.random.default_rng(0).normal(0, 100, (4, 4)), 1).tolist())
    return ('{"inputs": [' + ",".join([image] * n) + "]}").encode()


def send_and_leave_open(server: Server, body: bytes) -> socket.socket:
    """POST `body` to /invocations and return the open connection, its answer unread."""
    connection = socket.create_connection(("127.0.0.1", server.port))
    head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    connection.sendall(f"{head}\r\n\r\n".encode() + body)
    return connection


def test_serve_answers_413_to_a_request_over_the_limit_and_goes_on(serve, checkpoint, scans, tmp_path):
    server = serve()
    huge = b'{"inputs": [' + b" " * 50_000_000 + b"]}"  # 50 MB: read no further than its Content-Length
    request = urllib.request.Request(f"{server.url}/invocations", huge, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    took = time.perf_counter() - start
    print(f"413 for a 50 MB body after {took:.3f} s")
    assert refused.value.code == 413 and took < 2
    error = json.loads(refused.value.read())
    assert error["error_code"] == "REQUEST_TOO_LARGE" and f"limit of {MAX_MB} MB" in error["message"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # no Content-Length: counted
    connection.request("POST", "/invocations", (b" " * 1_000_000 for _ in range(3 * MAX_MB)),
                       {"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
    assert connection.getresponse().status == 413
    urllib.request.urlopen(f"{server.url}/ping", timeout=5)
    images = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")])
    scores = [p["score"] for p in post(f"{server.url}/invocations", {"inputs": images.tolist()})["predictions"]]
    np.testing.assert_allclose(scores, cli_scores(checkpoint, scans / "clean.nii.gz", tmp_path), rtol=1e-5)


def test_serve_flags_images_it_cannot_score(serve, scans):
    images = np.stack([s.image for s in iter_slices(scans / "clean.nii.gz")])
    assert_flagged(post(f"{serve().url}/invocations", {"inputs": flagged_images(images).tolist()})["predictions"])


def test_serve_stops_scoring_a_request_whose_client_left(serve):
    server = serve()
    connection = send_and_leave_open(server, slow_body())
    time.sleep(1)  # scoring under way
    connection.close()
    left, deadline = time.time(), time.time() + 30
    pattern = r"request abandoned \(client disconnected\): scoring stopped after (\d+) of 4000 images"
    while not (found := re.search(pattern, server.output())):
        assert time.time() < deadline, server.output()[-3000:]
        time.sleep(0.1)
    print(f"scoring stopped {time.time() - left:.1f} s after the client left, at image {found[1]} of 4000")
    assert int(found[1]) < 4000
    urllib.request.urlopen(f"{server.url}/ping", timeout=5)


def test_serve_exits_soon_after_sigterm_during_a_request(serve):
    server = serve()
    connection = send_and_leave_open(server, slow_body())
    time.sleep(1)
    start = time.perf_counter()
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=30)
    took = time.perf_counter() - start
    connection.close()
    print(f"exit {took:.1f} s after SIGTERM, a request in flight (--shutdown-timeout 1)")
    assert took < 6, server.output()[-3000:]
