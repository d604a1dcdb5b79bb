"""`make demo`: the main job end to end on generated CT phantoms, in about 10 minutes on 2 CPU cores;
`make demo-brain` (`--anatomy brain`): the same gate on brain-MR subjects of the MNI152 template (needs
`cdm-ood[anatomy]`), with the artifacts, orientation and coverage errors, wrong-modality files and local defects
of issues 14 and 44.

1. `cdm-ood train --config phantoms-ct` (`brain-mr`): generates the training scans, trains, calibrates on
   validation;
2. `cdm-ood calibrate` again on 8 new clean volumes (the validation split of 24 training volumes is only 2
   volumes, too few for a 5% threshold);
3. `cdm-ood make-phantoms` held-out test scans: 4 new clean volumes and their corrupted copies (CT: 6 MONAI-made
   artifacts x mild/strong, as DICOM series; brain: every artifact at its reject strength, every orientation and
   coverage error, and the wrong-modality files, `--ood-sets`, and every local defect, `--defects`);
4. per-set AUROC / FPR95 of every calibrated detector (slice level), ROC and histogram PNGs;
5. `cdm-ood score` over the test folder: the gate's report, logged to MLflow, and its verdicts per set.

Everything lands in OUT (default `demo/`, `demo-brain/`): the run, the data, `eval/`, `report.csv`, `mlflow.db`.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SCANS = {  # make-phantoms options of each anatomy's scans, and what its test set holds
    "body": ("phantoms-ct", ("--format", "nifti", "--size", "32"), ("--format", "dicom", "--size", "32", "--corrupt")),
    "brain": ("brain-mr", ("--format", "nifti", "--anatomy", "brain", "--size", "64", "--slices", "24"),
              ("--format", "nifti", "--anatomy", "brain", "--size", "64", "--slices", "24", "--ood-sets", "--defects")),
}  # fmt: skip


def run(*args: str, cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """A real `cdm-ood` command, echoed first."""
    print(f"\n$ cdm-ood {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "cdm_ood.cli", *args], cwd=cwd)
    if done.returncode not in ok:
        sys.exit(f"demo: `cdm-ood {args[0]}` failed with exit code {done.returncode}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Output folder [default: demo/, demo-brain/ for brain].")
    parser.add_argument("--anatomy", choices=sorted(SCANS), default="body", help="CT phantoms or brain MR.")
    parser.add_argument("--steps", type=int, help="Training steps [default: the config's].")
    args = parser.parse_args()
    start = time.perf_counter()
    config, scans, test_scans = SCANS[args.anatomy]
    out = (args.out or Path("demo" if args.anatomy == "body" else "demo-brain")).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = () if args.steps is None else ("--set", f"train.steps={args.steps}")
    run("train", "--config", config, "--out-dir", "run", "--set", "data.root=data/train", *steps, cwd=out)
    run("make-phantoms", "--out-dir", "data/calib", "--n", "8", *scans, "--seed", "2", cwd=out)
    checkpoint = out / "run" / "model.pt"
    run("calibrate", "data/calib", "--checkpoint", str(checkpoint), cwd=out)
    run("make-phantoms", "--out-dir", "data/test", "--n", "4", *test_scans, "--seed", "1", cwd=out)
    manifest = out / "data" / "test" / "manifest.csv"
    run("evaluate", str(manifest), "--checkpoint", str(checkpoint), "--ood", str(manifest), "--out-dir", "eval",
        cwd=out)  # fmt: skip
    gate = run("score", "data/test", "--checkpoint", str(checkpoint), "--out", "report.csv", "--maps", "maps",
               cwd=out, ok=(0, 1))  # fmt: skip
    with open(manifest, newline="") as f:
        kind = {(manifest.parent / r["path"]).resolve(): r["artifact"] for r in csv.DictReader(f)}
    with open(out / "report.csv", newline="") as f:
        volumes = [r for r in csv.DictReader(f) if r["level"] != "slice"]  # volumes, and files not read
    verdicts = Counter(f"{kind.get((out / r['path']).resolve(), 'unlisted')} -> {r['verdict']}" for r in volumes)
    print("\ngate verdicts per volume or unread file, by set (`none`: clean):", dict(sorted(verdicts.items())),
          f"exit code {gate.returncode}")  # fmt: skip
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; outputs in {out}: run/model.pt, eval/ (metrics, ROC "
          f"and histogram PNGs), report.csv, report_hist.png, report.html (the QA page: open it in a browser), "
          f"maps/, mlflow.db (`mlflow ui --backend-store-uri "
          f"sqlite:///{out}/mlflow.db`)")  # fmt: skip


if __name__ == "__main__":
    main()
