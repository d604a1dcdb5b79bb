"""Archive-scale scoring: torchrun-sharded `cdm-ood score` (real gloo processes) and resuming a killed run."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import clean_env

from cdm_ood.data.phantoms import make_phantoms


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """12 DICOM series of 6 slices (72 files) and one unreadable file."""
    folder = tmp_path_factory.mktemp("archive") / "dicom"
    make_phantoms(folder, 12, "dicom", size=16, slices=6, seed=3)  # its manifest.csv is ignored by name
    (folder / "junk.bin").write_bytes(bytes(range(256)))
    return folder


def score(*args, cwd: Path, runner=(), wait=True):
    env = clean_env({"OMP_NUM_THREADS": "1"})
    command = [sys.executable, *runner, "-m", "cdm_ood.cli", "score", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def rows(report: Path) -> list[dict]:
    with open(report, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["level"], r["path"], r["slice"], r["volume"]))


def same_report(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, scores to float32 batch-composition noise."""
    exact = [{k: v for k, v in r.items() if k != "score"} for r in a] == [
        {k: v for k, v in r.items() if k != "score"} for r in b
    ]
    scores = [(float(x["score"] or "nan"), float(y["score"] or "nan")) for x, y in zip(a, b, strict=True)]
    return exact and all(x == pytest.approx(y, rel=1e-5, nan_ok=True) for x, y in scores)


def torchrun(n: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip


def test_two_torchrun_processes_give_the_single_process_report(checkpoint, archive, tmp_path):
    one = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "one.csv", "--no-fail", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "two.csv", "--no-fail", cwd=tmp_path,
                runner=torchrun(2))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, merged = rows(tmp_path / "one.csv"), rows(tmp_path / "two.csv")
    assert len(single) == 73 + 12 and same_report(merged, single), "every file exactly once, same scores and verdicts"
    assert not list(tmp_path.glob(".*.parts")), "partial reports are removed after the merge"


def test_a_killed_run_resumes_without_rescoring_or_duplicates(checkpoint, archive, tmp_path):
    reference = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "ref.csv", "--batch-size", 1,
                      "--no-fail", cwd=tmp_path)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "report.csv"
    parts = tmp_path / ".report.csv.parts"
    job = score(archive, "--checkpoint", checkpoint, "--out", out, "--batch-size", 1, "--no-fail", cwd=tmp_path,
                wait=False)  # fmt: skip
    deadline = time.time() + 120
    while len(list(parts.glob("rank*.csv"))) < 3 and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not out.exists() and len(list(parts.glob("rank*.csv"))) >= 3, "killed after some parts, before the merge"
    resumed = score(archive, "--checkpoint", checkpoint, "--out", out, "--batch-size", 1, "--resume", "--no-fail",
                    cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped = int(resumed.stderr.split(" files already scored")[0].rsplit(" ", 1)[-1])
    assert 3 <= skipped < 72, "the finished files were not scored again"
    assert rows(out) == rows(tmp_path / "ref.csv"), "the full report, no duplicate rows"
