"""Wall-clock throughput of `cdm-ood score` with 1 process and with N torchrun processes on one machine.

    python benchmarks/score_sharded.py --checkpoint demo/run/model.pt [--volumes 32] [--procs 2]

Generates CT phantom DICOM series at the model's size, then runs the real command (as users do, start-up
included) once per setting and prints files/s; also checks that both reports have the same rows.
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

from cdm_ood.checkpoint import load_model
from cdm_ood.data.phantoms import make_phantoms


def run(command: list[str], threads: int) -> float:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def verdicts(report: Path) -> list[tuple[str, str, str]]:
    with open(report, newline="") as f:
        return sorted((r["path"], r["slice"], r["verdict"]) for r in csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--volumes", type=int, default=32, help="DICOM series of 16 slices each.")
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    size = load_model(args.checkpoint).spec.size[-1]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "archive"
        make_phantoms(folder, args.volumes, "dicom", size=size, slices=16, seed=1)
        (folder / "manifest.csv").unlink()
        n = args.volumes * 16
        score = ["-m", "cdm_ood.cli", "score", str(folder), "--checkpoint", str(args.checkpoint), "--no-fail"]
        one = run([sys.executable, *score, "--out", f"{tmp}/one.csv"], cores)
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.procs}",
                    "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip
        many = run([*torchrun, *score, "--out", f"{tmp}/many.csv"], max(1, cores // args.procs))
        same = [verdicts(Path(tmp) / f"{name}.csv") for name in ("one", "many")]
    print(f"{n} DICOM files of {size}x{size}, {cores} cores")
    print(f"1 process:   {one:6.1f} s  {n / one:7.1f} files/s")
    print(f"{args.procs} processes: {many:6.1f} s  {n / many:7.1f} files/s  (speed-up {one / many:.2f}x)")
    print("same rows and verdicts:", same[0] == same[1])


if __name__ == "__main__":
    main()
