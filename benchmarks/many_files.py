"""Wall time and peak memory of `cdm-ood score` over a folder of 100,000 files, most of them not scans: the
fail-closed probe's archive (every file gets a row; nothing is dropped), measured on the real command (a child
process: its peak resident set size from getrusage, `bombs.peak_of`).

    python benchmarks/many_files.py --checkpoint runs/<run>/model.pt [--files 100000] [--limit-gib 1] [--limit-s 90]

The folder holds one clean CT phantom DICOM series (16 slices of 32x32) and, in sub-folders of 1,000 files, small
files in equal shares: text sidecars (`*.txt`, left out by the default ignore list: `ignored` rows) and unknown
binaries (`unreadable` rows). Prints the block `many-files` of `tables.emit`: files, rows per verdict, slices
scored, wall time and peak memory; exits 1 if a file has no row, the series is not scored, or the run passes
--limit-gib or --limit-s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from bombs import peak_of
from tables import emit, markdown

from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series

SLICES = 16
PER_FOLDER = 1000


def write_archive(root: Path, files: int) -> None:
    """The clean series and `files - SLICES` small non-image files, alternately ignored and unreadable."""
    write_dicom_series(phantom_volume(np.random.default_rng(0), size=32, slices=SLICES), root / "series",
                       modality="ct", volume_index=0)  # fmt: skip
    for i in range(files - SLICES):
        folder = root / f"batch_{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir()
        name = f"note_{i:06d}.txt" if i % 2 == 0 else f"blob_{i:06d}.bin"
        (folder / name).write_bytes(b"\x00\x01cdm" + i.to_bytes(4, "little"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--files", type=int, default=100_000, help="Files in the folder, the series included.")
    parser.add_argument("--limit-gib", type=float, default=1.0, help="Fail when the peak memory passes this.")
    parser.add_argument("--limit-s", type=float, default=90.0, help="Fail when the run takes longer.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {args.files} files", file=sys.stderr, flush=True)
        write_archive(tmp / "archive", args.files)
        report = tmp / "report.json"
        command = [sys.executable, "-m", "cdm_ood.cli", "score", str(tmp / "archive"), "--checkpoint",
                   str(args.checkpoint.resolve()), "--threshold", "1e12", "--out", str(report)]  # fmt: skip
        run, peak_gib, wall_s = peak_of(command, tmp)
        rows = json.loads(report.read_text())["rows"] if report.exists() else []
    files = [r for r in rows if r["level"] in ("slice", "file")]
    verdicts = Counter(r["verdict"] for r in files)
    scored = sum(r["level"] == "slice" and r["verdict"] == "in" for r in rows)
    table = markdown(
        ["files", "ignored rows", "unreadable rows", "slices scored", "exit", "wall time", "peak memory"],
        [[f"{args.files:,}", f"{verdicts['ignored']:,}", f"{verdicts['unreadable']:,}", scored, run.returncode,
          f"{wall_s:.0f} s", f"{peak_gib:.2f} GiB"]],
    )  # fmt: skip
    emit("many-files", table + f"\n\nlimits: {args.limit_gib:.2f} GiB, {args.limit_s:.0f} s")
    complete = len({r["path"] for r in files}) == args.files
    ok = complete and scored == SLICES and run.returncode == 1 and peak_gib < args.limit_gib and wall_s < args.limit_s
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
