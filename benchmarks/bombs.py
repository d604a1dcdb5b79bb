"""Peak memory of `cdm-ood score` over a folder of decompression bombs, a FIFO and a clean control series,
measured on the real command (a child process: its peak resident set size from getrusage).

    python benchmarks/bombs.py --checkpoint runs/<run>/model.pt [--limit-gib 2]

The bombs are those of the fail-closed issue: a 1 MB .nii.gz of 1024^3 voxels, a 4 MB one of 2048x2048x1024,
a 4 MB deflated DICOM of 65535^2 (8-bit), a 0.3 MB deflated DICOM of 16384^2 (16-bit) and a 13000^2 PNG. Prints
one row per file (size on disk, size inflated, verdict, reason) and the peak memory of scoring the control series
alone and with the bombs beside it, as the block `bombs` of `tables.emit`; exits 1 if a bomb is not refused, the
control series is not scored or the peak passes --limit-gib.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from bomb_factory import deflated_dicom_bomb, gzip_nifti_bomb, png_bomb
from tables import emit, markdown

from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series

BOMBS = {  # name: (writer, inflated bytes)
    "cube.nii.gz": (lambda p: gzip_nifti_bomb(p, (1024, 1024, 1024)), 1024**3),
    "slab.nii.gz": (lambda p: gzip_nifti_bomb(p, (2048, 2048, 1024)), 2048 * 2048 * 1024),
    "wide.dcm": (lambda p: deflated_dicom_bomb(p, 65535, 65535), 65535**2),
    "big16.dcm": (lambda p: deflated_dicom_bomb(p, 16384, 16384, bits=16), 2 * 16384**2),
    "huge.png": (lambda p: png_bomb(p, 13000, 13000), 13000**2),
}


def peak_of(command: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `command` in a fresh child (via a helper process, so that getrusage sees only this child): its result,
    peak resident memory in GiB and wall time in seconds."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, *command], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = int(out.stderr.strip().splitlines()[-1])
    return out, peak_kib / 2**20, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--limit-gib", type=float, default=2.0, help="Fail when the peak passes this.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        control, folder = tmp / "control", tmp / "scans"
        write_dicom_series(phantom_volume(np.random.default_rng(0), size=32, slices=8), control / "series",
                           modality="ct", volume_index=0)  # fmt: skip
        folder.mkdir()
        for name, (write, _) in BOMBS.items():
            write(folder / name)
        os.mkfifo(folder / "pipe.dcm")
        (folder / "control").symlink_to(control, target_is_directory=True)
        score = [sys.executable, "-m", "cdm_ood.cli", "score", "--checkpoint", str(args.checkpoint.resolve()),
                 "--threshold", "1e12"]  # fmt: skip
        alone, alone_gib, alone_s = peak_of([*score, str(control), "--out", str(tmp / "alone.json")], tmp)
        bombs, bombs_gib, bombs_s = peak_of([*score, str(folder), "--out", str(tmp / "bombs.json")], tmp)
        rows = {Path(r["path"]).name: r for r in json.loads((tmp / "bombs.json").read_text())["rows"]}
        scored = sum(r["verdict"] == "in" for r in rows.values() if r["level"] == "slice")
        files = [[name, f"{(folder / name).stat().st_size / 1e6:.2f} MB", f"{inflated / 2**30:.2f} GiB",
                  rows[name]["verdict"], rows[name]["reason"]] for name, (_, inflated) in BOMBS.items()]  # fmt: skip
        files.append(["pipe.dcm", "FIFO", "-", rows["pipe.dcm"]["verdict"], rows["pipe.dcm"]["reason"]])
        summary = (f"control series: {scored} of 8 slices scored beside the bombs\n"
                   f"peak memory of `cdm-ood score`: control alone {alone_gib:.2f} GiB ({alone_s:.1f} s); with the "
                   f"bombs {bombs_gib:.2f} GiB ({bombs_s:.1f} s); limit {args.limit_gib:.2f} GiB")  # fmt: skip
        emit("bombs", markdown(["file", "on disk", "inflated", "verdict", "reason"], files) + "\n\n" + summary)
        refused = all(rows[name]["verdict"] == "unreadable" for name in [*BOMBS, "pipe.dcm"])
        ok = refused and scored == 8 and bombs_gib < args.limit_gib and alone.returncode == 0 and bombs.returncode == 1
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
