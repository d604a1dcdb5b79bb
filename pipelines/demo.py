"""`make demo`: the main job end to end on generated CT phantoms, in about 10 minutes on 2 CPU cores.

1. `cdm-ood train --config phantoms-ct` (generates the training phantoms, trains, calibrates on validation);
2. `cdm-ood calibrate` again on 8 new clean phantom volumes (128 slices: the validation split of 24 training
   volumes is only 2 volumes, too few for a 5% threshold);
3. `cdm-ood make-phantoms` held-out test scans: 4 new clean CT volumes and their 12 corrupted copies each
   (6 MONAI-made artifacts x mild/strong) as DICOM series;
4. per-artifact AUROC / FPR95 of every calibrated detector (slice level), ROC and histogram PNGs;
5. `cdm-ood score` over the test series: the gate's report and verdicts, logged to MLflow.

Everything lands in OUT (default `demo/`): the run, the data, `eval/`, `report.csv`, `mlflow.db`.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def run(*args: str, cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """A real `cdm-ood` command, echoed first."""
    print(f"\n$ cdm-ood {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "cdm_ood.cli", *args], cwd=cwd)
    if done.returncode not in ok:
        sys.exit(f"demo: `cdm-ood {args[0]}` failed with exit code {done.returncode}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--steps", type=int, default=1000, help="Training steps.")
    args = parser.parse_args()
    start = time.perf_counter()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run("train", "--config", "phantoms-ct", "--out-dir", "run", "--set", "data.root=data/train", "--set",
        f"train.steps={args.steps}", cwd=out)  # fmt: skip
    run("make-phantoms", "--out-dir", "data/calib", "--n", "8", "--format", "nifti", "--size", "32", "--seed", "2",
        cwd=out)  # fmt: skip
    checkpoint = out / "run" / "model.pt"
    run("calibrate", "data/calib", "--checkpoint", str(checkpoint), cwd=out)
    run("make-phantoms", "--out-dir", "data/test", "--n", "4", "--format", "dicom", "--size", "32", "--corrupt",
        "--seed", "1", cwd=out)  # fmt: skip
    run("evaluate", "data/test/manifest.csv", "--checkpoint", str(checkpoint), "--ood", "data/test/manifest.csv",
        "--out-dir", "eval", cwd=out)  # fmt: skip
    series = sorted(str(p.relative_to(out)) for p in (out / "data" / "test").iterdir() if p.is_dir())
    gate = run("score", *series, "--checkpoint", str(checkpoint), "--out", "report.csv", cwd=out, ok=(0, 1))
    with open(out / "report.csv", newline="") as f:
        volumes = [r for r in csv.DictReader(f) if r["level"] == "volume"]
    kinds = ["clean" if re.fullmatch(r"phantom_\d+", Path(r["path"]).name) else "corrupted" for r in volumes]
    verdicts = Counter(f"{kind} -> {r['verdict']}" for kind, r in zip(kinds, volumes, strict=True))
    print("\ngate verdicts per series:", dict(sorted(verdicts.items())), f"exit code {gate.returncode}")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; outputs in {out}: run/model.pt, eval/ (metrics, ROC "
          f"and histogram PNGs), report.csv, report_hist.png, mlflow.db (`mlflow ui --backend-store-uri "
          f"sqlite:///{out}/mlflow.db`)")  # fmt: skip


if __name__ == "__main__":
    main()
