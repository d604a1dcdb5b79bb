"""`make evidence`: run every benchmark and evidence script at CPU scale and rewrite each docs table from its output.

    python tools/evidence.py                      # every step, in order (the full run: see docs/evidence.md)
    python tools/evidence.py --only ranking-mnist # one step (and the steps that make what it needs, if missing)
    python tools/evidence.py --from-store         # rebuild the docs from the MLflow store, running nothing
    python tools/evidence.py --list

Each step is one command (`STEPS`). A script prints every result a doc shows as a named block
(`benchmarks/tables.py`: `<!-- table: name -->` ... `<!-- /table -->`); this tool streams the command's output to the
terminal and to `runs/evidence/<step>.log`, takes its blocks and replaces the block of the same name in docs/*.md,
adding a line that names the command, its wall time, the machine, the date and the commit. Each finished step is
also an MLflow run (experiment `cdm-ood-evidence-tables`: the command, the commit, the log and the blocks), so
`--from-store` rebuilds every table without retraining. A step whose blocks are missing from its output, or a
command that fails, stops the run with the step named.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from tables import BLOCK, blocks  # noqa: E402

from cdm_ood.utils.io import atomic_write  # noqa: E402

DOCS = ROOT / "docs"
WORK = Path("runs/evidence")
EXPERIMENT = "evidence-tables"  # MLflow experiment cdm-ood-evidence-tables
MNIST = WORK / "mnist"
DEMO = WORK / "demo"
BRAIN = WORK / "brain"
CT128 = WORK / "ct128"


@dataclass(frozen=True)
class Step:
    """One command of the evidence run: the table blocks it must print, what it makes for later steps (`makes`,
    a path) and the steps whose outputs it reads (`needs`)."""

    name: str
    command: tuple[str, ...]
    tables: tuple[str, ...] = ()
    makes: str = ""
    needs: tuple[str, ...] = ()

    @property
    def script(self) -> str:
        """The repository file the command runs (`cdm-ood` for the installed command line)."""
        return next((a for a in self.command if a.endswith(".py")), self.command[0])

    def shell(self) -> str:
        return " ".join(self.command)


def _py(script: str, *args: object) -> tuple[str, ...]:
    return ("python", script, *(str(a) for a in args))


def _cdm(*args: object) -> tuple[str, ...]:
    return ("cdm-ood", *(str(a) for a in args))


def _scans(out: Path, n: int, size: int, slices: int, *extra: str, seed: int) -> tuple[str, ...]:
    return _cdm("make-phantoms", "--out-dir", out, "--n", n, "--format", "nifti", "--size", size, "--slices", slices,
                "--seed", seed, *extra)  # fmt: skip


def _brain_scans(out: Path, n: int, *extra: str, seed: int = 99) -> tuple[str, ...]:
    return _scans(out, n, 64, 24, "--anatomy", "brain", *extra, seed=seed)


def _ct_scans(out: Path, n: int, *extra: str, seed: int) -> tuple[str, ...]:
    """CT phantoms on the grid of the `demo` step's model (`configs/phantoms-ct.yaml`)."""
    return _scans(out, n, 32, 16, *extra, seed=seed)


# fmt: off
STEPS: tuple[Step, ...] = (
    Step("parameters", _py("tools/doc_tables.py"), ("artifact-strengths", "detector-costs", "corpus-series")),
    Step("train-time", _py("benchmarks/train_time.py", "--out-dir", MNIST, "--replace"), ("train-time",),
         str(MNIST / "model.pt")),
    Step("sampler-accuracy", _py("benchmarks/sampler_accuracy.py", "--checkpoint", MNIST / "model.pt"),
         ("sampler-accuracy", "sampler-step-cost"), needs=("train-time",)),
    Step("demo", _py("pipelines/demo.py", "--out", DEMO), makes=str(DEMO / "run" / "model.pt")),
    Step("step-cost", _py("benchmarks/step_cost.py", "--steps", 20), ("step-cost",)),
    Step("likelihood-cost", _py("benchmarks/likelihood_cost.py", "--checkpoint", MNIST / "model.pt"),
         ("likelihood-cost",), needs=("train-time",)),
    Step("ct128-model", _cdm("train", "--config", "phantoms-ct-128", "--out-dir", CT128 / "run", "--set",
                             f"data.root={CT128 / 'train'}"), makes=str(CT128 / "run" / "model.pt")),
    Step("score-throughput", _py("benchmarks/score_throughput.py", "--checkpoint", DEMO / "run" / "model.pt"),
         ("score-throughput",), needs=("demo",)),
    Step("score-throughput-128", _py("benchmarks/score_throughput.py", "--checkpoint", CT128 / "run" / "model.pt",
                                     "--volumes", 4, "--workers", "auto", "--name", "score-throughput-128"),
         ("score-throughput-128",), needs=("ct128-model",)),
    Step("score-512", _py("benchmarks/score_throughput.py", "--checkpoint", CT128 / "run" / "model.pt", "--size", 512,
                          "--volumes", 8, "--detector", "nll", "--workers", "auto", "--name", "score-cost-512"),
         ("score-cost-512",), needs=("ct128-model",)),
    Step("score-precision", _py("benchmarks/precision.py", "--checkpoint", DEMO / "run" / "model.pt", "--calib",
                                DEMO / "data" / "calib", "--test", DEMO / "data" / "test" / "manifest.csv"),
         ("score-precision",), needs=("demo",)),
    Step("score-sharded", _py("benchmarks/score_sharded.py", "--checkpoint", DEMO / "run" / "model.pt"),
         ("score-sharded",), needs=("demo",)),
    Step("bombs", _py("benchmarks/bombs.py", "--checkpoint", DEMO / "run" / "model.pt"), ("bombs",), needs=("demo",)),
    Step("node-receive", _py("benchmarks/node_receive.py", "--checkpoint", DEMO / "run" / "model.pt"),
         ("node-receive", "node-latency"), needs=("demo",)),
    Step("qa-page", _py("benchmarks/qa_page.py", "--checkpoint", DEMO / "run" / "model.pt", "--scans",
                        DEMO / "data" / "test"), ("qa-page-demo", "qa-page-size"), needs=("demo",)),
    Step("score-memory", _py("benchmarks/score_memory.py", "--checkpoint", DEMO / "run" / "model.pt"),
         ("score-memory",), needs=("demo",)),
    Step("many-files", _py("benchmarks/many_files.py", "--checkpoint", DEMO / "run" / "model.pt"), ("many-files",),
         needs=("demo",)),
    Step("denoising", _py("benchmarks/denoising.py", "--cdm", MNIST / "model.pt"), ("denoising",),
         needs=("train-time",)),
    Step("localization", _py("benchmarks/localization.py"), ("localization",)),
    Step("ood-baselines", _py("benchmarks/ood_baselines.py"), ("ood-baselines-mnist", "ood-baselines-phantoms")),
    Step("brain-model", _cdm("train", "--config", "brain-mr", "--out-dir", BRAIN / "run", "--set",
                             f"data.root={BRAIN / 'train'}"), makes=str(BRAIN / "run" / "model.pt")),
    Step("brain-ood-sets", _brain_scans(BRAIN / "ood", 6, "--ood-sets"), makes=str(BRAIN / "ood" / "manifest.csv")),
    Step("brain-held-out", _brain_scans(BRAIN / "held-out", 2), makes=str(BRAIN / "held-out" / "manifest.csv")),
    Step("real-scans-brain", _py("benchmarks/real_scans.py", "--checkpoint", BRAIN / "run" / "model.pt", "--data",
                                 BRAIN / "ood", "--train", BRAIN / "train" / "manifest.csv", "--name",
                                 "real-scans-brain"),
         ("real-scans-brain",), needs=("brain-model", "brain-ood-sets")),
    Step("brain-calibration", _brain_scans(BRAIN / "calibration", 120, seed=7),
         makes=str(BRAIN / "calibration" / "manifest.csv")),
    *(Step(f"brain-ood-sets-{k}", _brain_scans(BRAIN / f"ood-{k}", 6, "--ood-sets", seed=seed),
           makes=str(BRAIN / f"ood-{k}" / "manifest.csv")) for k, seed in ((2, 11), (3, 23), (4, 31))),
    Step("volume-checks", _py("benchmarks/volume_checks.py", "--checkpoint", BRAIN / "run" / "model.pt",
                              "--calibrate", BRAIN / "calibration", "--data", BRAIN / "ood",
                              *(BRAIN / f"ood-{k}" for k in (2, 3, 4))),
         ("volume-checks",), needs=("brain-model", "brain-ood-sets", *(f"brain-ood-sets-{k}" for k in (2, 3, 4)),
                                    "brain-calibration")),
    Step("brain-calibration-8", _brain_scans(BRAIN / "calibration-8", 8, seed=5),
         makes=str(BRAIN / "calibration-8" / "manifest.csv")),
    Step("volume-checks-8", _py("benchmarks/volume_checks.py", "--checkpoint", BRAIN / "run" / "model.pt",
                                "--calibrate", BRAIN / "calibration-8", "--data", BRAIN / "ood", "--name",
                                "volume-checks-8"),
         ("volume-checks-8",), needs=("brain-model", "brain-ood-sets", "brain-calibration-8")),
    Step("local-anomalies", _py("benchmarks/local_anomalies.py", "--checkpoint", BRAIN / "run" / "model.pt",
                                "--calibrate", BRAIN / "calibration", "--train", BRAIN / "train" / "manifest.csv"),
         ("local-anomalies",), needs=("brain-model", "brain-calibration")),
    Step("ct-calibration", _ct_scans(DEMO / "calibration", 120, seed=7),
         makes=str(DEMO / "calibration" / "manifest.csv")),
    Step("ct-ood-sets", _ct_scans(DEMO / "ood", 24, "--ood-sets", seed=99), makes=str(DEMO / "ood" / "manifest.csv")),
    Step("volume-checks-ct", _py("benchmarks/volume_checks.py", "--checkpoint", DEMO / "run" / "model.pt",
                                 "--calibrate", DEMO / "calibration", "--data", DEMO / "ood", "--name",
                                 "volume-checks-ct"),
         ("volume-checks-ct",), needs=("demo", "ct-calibration", "ct-ood-sets")),
    Step("normalisation", _py("benchmarks/normalisation.py"), ("normalisation",)),
    Step("ranking-mnist", _py("benchmarks/ranking.py", "--checkpoint", MNIST / "model.pt", "--data", "mnist",
                              "--images", 16, "--name", "ranking-mnist"), ("ranking-mnist",), needs=("train-time",)),
    Step("ranking-phantoms", _py("benchmarks/ranking.py", "--checkpoint", DEMO / "run" / "model.pt", "--images", 16,
                                 "--name", "ranking-phantoms"), ("ranking-phantoms",), needs=("demo",)),
    Step("ranking-brain", _py("benchmarks/ranking.py", "--checkpoint", BRAIN / "run" / "model.pt", "--data",
                              BRAIN / "held-out", "--images", 8, "--name", "ranking-brain"), ("ranking-brain",),
         needs=("brain-model", "brain-held-out")),
    Step("ablations", _py("benchmarks/ablations.py"), ("ablations",)),
    Step("architectures", _py("benchmarks/architectures.py"), ("architectures",)),
)
# fmt: on
BY_NAME = {s.name: s for s in STEPS}
LAUNCHERS = {"python": [sys.executable], "cdm-ood": [sys.executable, "-m", "cdm_ood.cli"]}  # this environment's


def machine() -> str:
    """The hardware and torch build the numbers were measured on."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores, {memory:.0f} GiB, {gpu}, {platform.system()}, "
            f"torch {importlib.metadata.version('torch')}")  # fmt: skip


def commit() -> str:
    """The checked-out commit, `+dirty` when tracked files other than docs/ (what the steps write) differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!docs"], cwd=ROOT).returncode != 0
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def provenance(step: Step, seconds: float, where: str, when: str, at: str) -> str:
    """The line under every generated block: command, wall time, machine, date, commit."""
    minutes, secs = divmod(round(seconds), 60)
    return f"*Printed by `{step.shell()}` ({minutes} min {secs} s) on {where}, {when}, commit {at} (`make evidence`).*"


def splice(doc: str, tables: dict[str, str]) -> tuple[str, set[str]]:
    """`doc` with the body of every block named in `tables` replaced; and the names it replaced."""
    found = set()

    def replace(m: re.Match) -> str:
        if m["name"] not in tables:
            return m[0]
        found.add(m["name"])
        return f"<!-- table: {m['name']} -->\n{tables[m['name']]}\n<!-- /table -->"

    return BLOCK.sub(replace, doc), found


def write_docs(tables: dict[str, str]) -> set[str]:
    """Splice `tables` into every docs/*.md (atomically); the names that some doc shows."""
    shown = set()
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        new, found = splice(text, tables)
        shown |= found
        if new != text:
            with atomic_write(path) as f:
                f.write(new)
    return shown


def run_step(step: Step, index: str, where: str) -> dict[str, str]:
    """Run one step with its output on the terminal and in its log; its blocks, each with its provenance line."""
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{step.name}.log"
    print(f"[{index}] {step.name}: {step.shell()}  (log: {log})", flush=True)
    command = [*LAUNCHERS[step.command[0]], *step.command[1:]]
    start = time.perf_counter()
    lines = []
    with open(log, "w") as out, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, bufsize=1) as child:  # fmt: skip
        for line in child.stdout:
            sys.stdout.write(line)
            out.write(line)
            out.flush()
            lines.append(line)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"evidence: step {step.name} failed (exit code {child.returncode}); its output is in {log}")
    printed = blocks("".join(lines))
    missing = [t for t in step.tables if t not in printed]
    if missing:
        sys.exit(f"evidence: step {step.name} did not print the table(s) {missing}; its output is in {log}")
    at = commit()
    line = provenance(step, seconds, where, datetime.date.today().isoformat(), at)
    tables = {t: f"{printed[t]}\n\n{line}" for t in step.tables}
    record(step, seconds, tables, log, at)
    print(f"[{index}] {step.name}: done in {seconds:.0f} s", flush=True)
    return tables


def record(step: Step, seconds: float, tables: dict[str, str], log: Path, at: str) -> None:
    """The step as an MLflow run: command and commit, wall time, its log and its blocks (`tables.json`)."""
    from cdm_ood.integrations.tracking import log_job_run

    saved = WORK / f"{step.name}.tables.json"
    saved.write_text(json.dumps(tables, indent=1))
    log_job_run(EXPERIMENT, {"step": step.name, "command": step.shell(), "commit": at},
                {"wall_seconds": seconds}, [log, saved])  # fmt: skip


def from_store(names: list[str]) -> dict[str, str]:
    """The blocks of the latest finished run of each step in the MLflow store."""
    from cdm_ood.integrations.tracking import _mlflow

    mlflow = _mlflow(None, f"cdm-ood-{EXPERIMENT}")
    tables = {}
    for name in names:
        runs = mlflow.search_runs(filter_string=f"params.step = '{name}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
        if runs.empty:
            print(f"evidence: no stored run of step {name}; its tables are left as they are", file=sys.stderr)
            continue
        path = mlflow.artifacts.download_artifacts(run_id=runs.run_id[0], artifact_path=f"{name}.tables.json")
        tables |= json.loads(Path(path).read_text())
    return tables


def plan(names: list[str]) -> list[Step]:
    """The steps to run for `names`, preceded by the steps they need whose output is missing, in `STEPS` order."""
    wanted = set(names)
    for name in names:
        wanted |= {n for n in BY_NAME[name].needs if not (ROOT / BY_NAME[n].makes).exists()}
    return [s for s in STEPS if s.name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="STEP", help="Run these steps only.")
    parser.add_argument("--from-store", action="store_true", help="Rebuild the docs from the MLflow store.")
    parser.add_argument("--list", action="store_true", help="List the steps and their commands.")
    args = parser.parse_args()
    names = args.only or list(BY_NAME)
    if args.list:
        for s in STEPS:
            print(f"{s.name:<18} {', '.join(s.tables) or '-':<45} {s.shell()}")
        return
    if args.from_store:
        write_docs(from_store(names))
        return
    where, start, steps = machine(), time.perf_counter(), plan(names)
    for i, step in enumerate(steps, 1):
        tables = run_step(step, f"{i}/{len(steps)}", where)
        unshown = set(tables) - write_docs(tables)
        if unshown:
            print(f"evidence: no doc shows the table(s) {sorted(unshown)}", file=sys.stderr)
    print(f"evidence: {len(steps)} steps in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
