"""Wall-clock throughput of `cdm-ood score` with 1 process and with N torchrun processes on one machine.

    python benchmarks/score_sharded.py --checkpoint demo/run/model.pt [--volumes 32 128] [--procs 2]

For each archive size, generates CT phantom DICOM series at the model's size, then runs the real command (as users
do, start-up included) once with 1 process and once with --procs torchrun processes, and checks that both reports
have the same rows and verdicts. Prints the table block `score-sharded` (one row per archive size: the files
scored, the wall time of each); exits 1 if a pair of reports differs or a file was not scored.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import emit, markdown

from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.model.checkpoint import load_model


def run(command: list[str], threads: int) -> float:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def verdicts(report: Path) -> list[tuple[str, str, str, str]]:
    with open(report, newline="") as f:
        return sorted((r["path"], r["level"], r["slice"], r["verdict"]) for r in csv.DictReader(f))


def measure(
    checkpoint: Path, size: int, volumes: int, procs: int, cores: int, tmp: Path
) -> tuple[int, float, float, bool]:
    """Files scored (slice rows of the 1-process report), seconds of 1 process and of `procs` torchrun processes on
    `volumes` series, and whether both reports have the same rows and verdicts."""
    folder = tmp / "archive"
    make_phantoms(folder, volumes, "dicom", size=size, slices=16, seed=1)
    (folder / "manifest.csv").unlink()
    score = ["-m", "cdm_ood.cli", "score", str(folder), "--checkpoint", str(checkpoint), "--no-fail"]
    one = run([sys.executable, *score, "--out", f"{tmp}/one.csv"], cores)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip
    many = run([*torchrun, *score, "--out", f"{tmp}/many.csv"], max(1, cores // procs))
    rows = verdicts(tmp / "one.csv")
    return sum(level == "slice" for _, level, _, _ in rows), one, many, rows == verdicts(tmp / "many.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--volumes", type=int, nargs="+", default=[32, 128], help="DICOM series of 16 slices each.")
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    size = load_model(args.checkpoint).spec.size[-1]
    rows, ok = [], []
    for volumes in args.volumes:
        print(f"{volumes} series of 16 slices", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            n, one, many, same = measure(args.checkpoint, size, volumes, args.procs, cores, Path(tmp))
        rows.append([n, f"{one:.1f} s ({n / one:.0f} files/s)", f"{many:.1f} s ({n / many:.0f} files/s)",
                     "yes" if same else "no"])  # fmt: skip
        ok.append(same and n == volumes * 16)
    header = ["files", "1 process", f"{args.procs} torchrun processes", "same rows and verdicts"]
    emit("score-sharded", markdown(header, rows) + f"\n\n{size}x{size} DICOM slices, {cores} cores")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
