"""Time per step, wall time, peak memory and validation bits/dim of the real `cdm-ood train`.

    python benchmarks/train_time.py --out-dir runs/evidence/mnist [--steps 1000] [--config NAME] [--set KEY=VALUE]
                                    [--tracking-uri URI | --no-mlflow] [--replace]

Runs `cdm-ood train` (the embedded default config unless --config) in a child process, as a user does, and leaves
its run folder and trained `model.pt` at --out-dir. Measures the wall time (start-up included) and the child's peak
resident memory (getrusage); reads the time per step (the median over the log intervals of `train.log_every` steps)
and the validation bits/dim of each validation from the run folder's `metrics.jsonl`. Prints the table block
`train-time` and, unless --no-mlflow, logs these numbers to MLflow (`cdm-ood-evidence`, tagged with the training
run) beside the training run itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tables import emit, markdown


def train(args: argparse.Namespace) -> tuple[float, float]:
    """Run `cdm-ood train` in a child process (its log on stderr); its wall time (s) and peak resident memory (GiB).
    Nothing else runs as a child of this process, so RUSAGE_CHILDREN is the training process's."""
    command = [sys.executable, "-m", "cdm_ood.cli", "train", "--out-dir", str(args.out_dir)]
    command += ["--config", args.config] if args.config else []
    command += [arg for key in [*args.set, f"train.steps={args.steps}"] for arg in ("--set", key)]
    if not args.mlflow or args.tracking_uri:
        command += ["--no-mlflow"] if not args.mlflow else ["--tracking-uri", args.tracking_uri]
    print(" ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=sys.stderr)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"cdm-ood train failed (exit {done.returncode}); its log is above")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="The run folder (must not exist, or --replace).")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--config", help="A bundled config name or a YAML path [default: the embedded default].")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="A config override.")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI [default: cdm-ood's].")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                        help="Track nothing in MLflow [default: $CDM_OOD_MLFLOW, else track].")  # fmt: skip
    parser.set_defaults(mlflow=os.environ.get("CDM_OOD_MLFLOW", "true").lower() not in {"0", "false", "no", "off"})
    parser.add_argument("--replace", action="store_true", help="Delete an existing --out-dir first.")
    args = parser.parse_args()
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        if not args.replace:
            sys.exit(f"{args.out_dir} exists: give another --out-dir, or --replace to delete it first")
        shutil.rmtree(args.out_dir)
    wall, peak_gib = train(args)
    from cdm_ood.integrations.tracking import log_job_run
    from cdm_ood.model.checkpoint import load_model  # torch: imported once the checks above have passed

    records = [json.loads(line) for line in (args.out_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = statistics.median(1 / r["steps_per_s"] for r in records if "steps_per_s" in r)
    validations = [(r["step"], r["val_bpd"]) for r in records if "val_bpd" in r]
    model = load_model(args.out_dir / "model.pt")
    c = model.config
    parameters = sum(p.numel() for p in model.classifier.parameters())
    name = f"`{c['name']}`" + (" (default: " if args.config is None else " (")
    setting = (
        f"{name}batch {c['train']['batch_size']}, {'x'.join(map(str, c['data']['size']))}, UNet "
        f"{tuple(c['model']['channels'])}, {parameters / 1e3:.0f}k parameters, T = {c['schedule']['T']} "
        f"{c['schedule']['kind']})"
    )
    earlier = ", ".join(f"{step}: {bpd:.2f}" for step, bpd in validations[:-1])
    row = [setting, model.step, f"{per_step:.2f} s ({1 / per_step:.1f} steps/s)", duration(wall),
           f"{validations[-1][1]:.2f}" + (f" ({earlier})" if earlier else ""), f"{peak_gib:.2f} GiB"]  # fmt: skip
    counted = f"{len(validations)} validation" + ("s" if len(validations) != 1 else "")
    wall_header = f"wall time (incl. start-up, {counted}{', MLflow' if args.mlflow else ''})"
    header = ["config", "steps", "time per step", wall_header, "val bits/dim", "peak RSS"]
    emit("train-time", markdown(header, [row]))
    if args.mlflow:
        metrics = {"wall_s": wall, "s_per_step": per_step, "peak_rss_gib": peak_gib, "val_bpd": validations[-1][1]}
        params = {"benchmark": "train_time", "out_dir": str(args.out_dir), "config": args.config, "steps": args.steps}
        log_job_run("evidence", params, metrics, [], args.tracking_uri, model)


if __name__ == "__main__":
    main()
