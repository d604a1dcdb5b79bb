"""Peak memory of `cdm-ood score` against the number of files: it must stay flat (the aim: 10x the files, within
10% of the peak).

    python benchmarks/score_memory.py --checkpoint runs/<run>/model.pt [--files 200 2000] [--size 256]

Writes generated CT phantom DICOM series (16 single-slice files each, `--size` pixels square) and runs the real
`cdm-ood score` over the first N files of them in a child process for each N, reading its peak resident memory from
getrusage (`bombs.peak_of`). Prints the table block `score-memory`: files, slices scored, peak memory, wall time,
and each peak relative to the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bombs import peak_of
from tables import emit, markdown

from cdm_ood.data.phantom_sets import make_phantoms

SLICES = 16  # per generated series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--files", type=int, nargs="+", default=[200, 2000], help="Folder sizes, in files.")
    parser.add_argument("--size", type=int, default=256, help="Pixels per side of the DICOM slices.")
    args = parser.parse_args()
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {max(args.files)} DICOM files of {args.size}x{args.size}", file=sys.stderr, flush=True)
        make_phantoms(tmp / "all", -(-max(args.files) // SLICES), "dicom", size=args.size, slices=SLICES, seed=2)
        files = sorted((tmp / "all").glob("*/*.dcm"))
        for n in args.files:
            folder = tmp / f"n{n}"
            for path in files[:n]:  # whole series, the last one cut short
                (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
                (folder / path.parent.name / path.name).symlink_to(path)
            report = tmp / f"n{n}.json"
            command = [sys.executable, "-m", "cdm_ood.cli", "score", str(folder), "--checkpoint",
                       str(args.checkpoint.resolve()), "--threshold", "1e12", "--out", str(report)]  # fmt: skip
            done, gib, seconds = peak_of(command, tmp)
            if done.returncode != 0:
                sys.exit(f"cdm-ood score over {n} files failed: {done.stderr[-2000:]}")
            slices = sum(r["level"] == "slice" for r in json.loads(report.read_text())["rows"])
            first = first or gib
            rows.append([n, slices, f"{gib:.3f} GiB", f"{seconds:.0f} s", f"{gib / first:.3f}"])
            print(f"{n} files: {gib:.3f} GiB in {seconds:.0f} s", file=sys.stderr, flush=True)
    header = ["files", "slices scored", "peak memory", "wall time", "peak / first"]
    emit("score-memory", markdown(header, rows) + (
        f"\n\nCT phantom DICOM series of {SLICES} slices of {args.size}x{args.size}; `cdm-ood score --threshold 1e12` "
        f"with the checkpoint's default detector, one child process per folder."
    ))  # fmt: skip


if __name__ == "__main__":
    main()
