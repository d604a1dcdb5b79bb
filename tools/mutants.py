"""`make mutants`: mutation testing of the modules a gate's pass rests on, then the mutants the tool cannot make.

    python tools/mutants.py              # mutmut over [tool.mutmut] (about an hour on 2 cores), the table into docs/
    python tools/mutants.py --report     # the table and the unexplained survivors of the last run (mutants/)
    python tools/mutants.py --survivors [MODULE ...]  # every mutant not killed, with its diff (what to review)
    python tools/mutants.py --again      # check again the mutants the last run neither killed nor explained
    python tools/mutants.py --explain REASON NAME ...  # list survivors as equivalent, with the reason (reviewed)
    python tools/mutants.py --hand [NAME ...]  # only the hand-made mutants (`HAND`), or these of them

mutmut (pinned in the `mutants` extra) mutates each function of the modules listed in pyproject's `[tool.mutmut]`
(operators, comparisons, constants, arguments, ...) and runs the tests of `pytest_add_cli_args_test_selection` that
reach it, fastest first; the session fixture's tiny model is trained once (`CDM_OOD_TEST_CACHE`). A mutant is killed
when a test fails or it runs past its time limit. Each mutant that survives, or that no selected test reaches, needs
a test that kills it or an entry in `tools/equivalent_mutants/` (one file per module): the function, the line before
and after, and the reason it cannot change behaviour (matched by text, so the entries outlive renumbered mutants).
The command prints the table per module (block `mutants`, spliced into docs/testing.md), then each unexplained
survivor with its diff and each stale entry, and exits 1 when there is one.

`HAND` holds what mutmut cannot make: a replaced expression (`floor` for `ceil`, a dropped term, another variable)
or a module outside its list (the MONAI transform, the served model, evaluation, the benchmarks). Each is applied
alone to a temporary copy of the tree (the working tree's files: `git ls-files`, tracked and untracked, less the
ignored), where the named tests first run on the unchanged copy (they must pass), then once with the change; pytest
runs there with this interpreter and PYTHONPATH set to the copy (the run stops unless `cdm_ood` then imports from
the copy). A hand mutant whose old text no longer occurs exactly once stops the run (the list cannot go stale).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import tomllib

ROOT = Path(__file__).resolve().parent.parent
BENCH = "tests/test_benchmarks.py::"
EQUIVALENT = ROOT / "tools" / "equivalent_mutants"  # one file per module: cdm_ood.ood.report.toml, ...
DOC = "testing.md"
KILLED = ("killed", "timeout")  # a mutant that runs past its time limit is caught too
SPINNER = re.compile("[\u2800-\u28ff]")  # the braille frames of mutmut's progress spinner


class Survivor(NamedTuple):
    name: str  # mutmut's, e.g. cdm_ood.ood.report.x_judge__mutmut_3
    status: str  # survived, no tests, ...
    function: str  # cdm_ood.ood.report.judge (a method: cdm_ood.ood.detectors.Detector.fit)
    old: tuple[str, ...]  # the changed lines, stripped
    new: tuple[str, ...]
    diff: str


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids expected to fail with the change


HAND = (
    Mutant(
        "dpm2-slope-over-h",
        "cdm_ood/diffusion/sampling.py",
        "slope = (eps - eps_prev) / (lam_t - math.log(a_p / s_p))",
        "slope = (eps - eps_prev) / h",
        (
            "tests/test_sampling.py::test_dpm_solver_2_step_solves_the_flow_exactly_when_eps_is_affine_in_lambda",
            "tests/test_sampling.py::test_dpm_solver_2_follows_the_exact_flow_of_gaussian_data",
        ),
    ),
    Mutant(
        "threshold-k-ceil",
        "cdm_ood/ood/calibration.py",
        "k = int(np.floor(fpr * len(ordered) + 1e-9))",
        "k = int(np.ceil(fpr * len(ordered) - 1e-9))",
        ("tests/test_ood_calibration.py::test_threshold_flags_floor_of_fpr_n_when_that_is_not_a_whole_number",),
    ),
    Mutant(
        "mahalanobis-without-precision",
        "cdm_ood/ood/detectors.py",
        "return ((z @ self.precision) * z).sum(1)",
        "return (z * z).sum(1)",
        (
            "tests/test_ood_detectors.py::test_multiscale_is_the_mahalanobis_distance_under_ledoit_wolf_on_"
            "standardised_features",
        ),
    ),
    Mutant(
        "mahalanobis-identity-precision",
        "cdm_ood/ood/detectors.py",
        "self.precision = torch.from_numpy(LedoitWolf().fit(((f - self.mean) / self.scale).numpy()).precision_)",
        "self.precision = torch.eye(f.shape[1], dtype=torch.float64)",
        (
            "tests/test_ood_detectors.py::test_multiscale_is_the_mahalanobis_distance_under_ledoit_wolf_on_"
            "standardised_features",
        ),
    ),
    Mutant(
        "score-oodd-never-flags",
        "cdm_ood/ood/transforms.py",
        'd[f"{key}_ood"] = result["verdict"] != IN',
        'd[f"{key}_ood"] = False',
        ("tests/test_pipelines.py::test_monai_chain_sets_aside_ood_slices",),
    ),
    Mutant(
        "score-oodd-flags-only-unscorable",
        "cdm_ood/ood/transforms.py",
        'd[f"{key}_ood"] = result["verdict"] != IN',
        'd[f"{key}_ood"] = result["verdict"] == FLAGGED',
        ("tests/test_pipelines.py::test_monai_chain_sets_aside_ood_slices",),
    ),
    Mutant(
        "evaluate-sets-swapped",
        "cdm_ood/ood/evaluation.py",
        "**ood_metrics(id_scores, scores)})",
        "**ood_metrics(scores, id_scores)})",
        ("tests/test_score.py::test_evaluate_writes_metrics_and_figures",),
    ),
    Mutant(
        "pyfunc-likelihood-of-t1",
        "cdm_ood/integrations/serving.py",
        'll = features["profile"][:, 0].double()',
        'll = features["profile"][:, 1].double()',
        ("tests/test_training.py::test_mlflow_run_in_the_default_sqlite_store_and_model_by_run_id",),
    ),
    Mutant(
        "likelihood-without-gaussian-term",
        "cdm_ood/diffusion/likelihood.py",
        "return logits - logits[:, -1:] + log_standard_normal(x)[:, None]",
        "return logits - logits[:, -1:]",
        (
            f"{BENCH}test_normalisation_prints_the_exact_bits_per_dim_and_is_tracked",
            f"{BENCH}test_likelihood_cost_counts_network_calls",
        ),
    ),
    Mutant(
        "ablation-variant-ignored",
        "benchmarks/ablations.py",
        "[*args.overrides, *steps, *overrides]",
        "[*args.overrides, *steps]",
        (f"{BENCH}test_ablations_then_denoising_print_their_tables",),
    ),
    Mutant(
        "denoising-eps-sign",
        "benchmarks/denoising.py",
        "F.mse_loss(predict_x0(eps, xt, t, schedule)",
        "F.mse_loss(predict_x0(-eps, xt, t, schedule)",
        (f"{BENCH}test_ablations_then_denoising_print_their_tables",),
    ),
    Mutant(
        "step-cost-ratio-inverted",
        "benchmarks/step_cost.py",
        "ratios = [c / d for c, d in",
        "ratios = [d / c for c, d in",
        (f"{BENCH}test_step_cost_prints_ratio_variants_and_phases",),
    ),
    Mutant(
        "ood-baselines-mean-is-max",
        "benchmarks/ood_baselines.py",
        "{np.mean(values):.3f}",
        "{np.max(values):.3f}",
        (f"{BENCH}test_ood_baselines_run_and_are_tracked",),
    ),
    Mutant(
        "throughput-swapped",
        "benchmarks/score_throughput.py",
        "b, f = n / statistics.median(bare[w]), n / statistics.median(full[w])",
        "b, f = n / statistics.median(full[w]), n / statistics.median(bare[w])",
        (f"{BENCH}test_score_throughput_measures_each_worker_count",),
    ),
    Mutant(
        "real-scans-sets-swapped",
        "benchmarks/real_scans.py",
        'ood_metrics(found["clean"], v)',
        'ood_metrics(v, found["clean"])',
        (f"{BENCH}test_real_scans_runs_on_the_ood_sets",),
    ),
    Mutant(
        "localization-masks-inverted",
        "benchmarks/localization.py",
        "**localization_metrics(list(maps), list(masks[touched]))",
        "**localization_metrics(list(maps), list(masks[touched] == 0))",
        (f"{BENCH}test_localization_measures_every_defect",),
    ),
)


def occurrences(m: Mutant, root: Path = ROOT) -> int:
    """How often the mutant's old text occurs in its file under `root`."""
    return (root / m.path).read_text().count(m.old)


def check_texts(root: Path = ROOT) -> list[str]:
    """One problem per mutant whose old text does not occur exactly once in its file (under `root`)."""
    return [f"{m.name}: its old text occurs {n} times in {m.path}, not once: update the list"
            for m in HAND if (n := occurrences(m, root)) != 1]  # fmt: skip


def copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, less the ignored) into `dest`, laid out so that `cdm_ood`
    and its sub-packages kept elsewhere in the repository (pyproject's package-dir: `cli/`, `configs/`) import from
    the copy rather than through the editable install of the original tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dirs.items():
        inside = dest / package.replace(".", "/")
        if not inside.exists():
            inside.symlink_to(dest / folder, target_is_directory=True)


def pytest(copy: Path, tests: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    """pytest's exit code (0 passed, 1 some failed, other: could not run them) and the end of its output, for
    `tests` run in `copy`."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    out = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    return out.returncode, (out.stdout + out.stderr)[-3000:]


def check_imports(copy: Path, env: dict[str, str]) -> None:
    """Refuse to run unless `cdm_ood` and its sub-packages really are imported from the copy."""
    code = (
        "import cdm_ood, cdm_ood.cli, cdm_ood.configs as c; print(cdm_ood.__file__, cdm_ood.cli.__file__, *c.__path__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, check=True)
    stray = [p for p in out.stdout.split() if not Path(p).resolve().is_relative_to(copy.resolve())]
    if stray:
        sys.exit(f"the copy's code is not what gets imported: {stray}")


def run_hand(names: list[str]) -> int:
    """Apply each hand mutant (or those of `names`) alone to a copy of the tree; 1 when one survives."""
    unknown = set(names) - {m.name for m in HAND}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}; known: {[m.name for m in HAND]}")
    problems = check_texts()
    for problem in problems:
        print(problem)
    chosen = [m for m in HAND if not names or m.name in names]
    mutants = [m for m in chosen if occurrences(m) == 1]
    rows = [(m.name, m.path, f"OLD TEXT FOUND {occurrences(m)} TIMES") for m in chosen if m not in mutants]
    with tempfile.TemporaryDirectory(prefix="cdm-mutants-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        check_imports(copy, env)
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, output = pytest(copy, tests, env)
        if code != 0:
            print(f"the named tests do not pass on the unchanged tree (pytest exit {code}):\n{output}")
            return 1
        print(f"baseline: the {len(tests)} named tests pass on the unchanged tree", flush=True)
        for m in mutants:
            path = copy / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            for test in m.tests:
                code, output = pytest(copy, (test,), env)
                outcome = {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR {code}")
                if code not in (0, 1):
                    print(output)
                print(f"  {m.name}: {outcome}", file=sys.stderr, flush=True)
                rows.append((m.name, test, outcome))
            path.write_text(original)
    header = ("mutant", "test", "outcome")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip())
    return 1 if problems or any(outcome != "killed" for *_, outcome in rows) else 0


def mutated_files() -> list[str]:
    """The modules `[tool.mutmut] only_mutate` lists, as paths from the repository root."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def run_mutmut(children: int, log: Path) -> None:
    """`mutmut run` over the listed modules, its progress on the terminal and in `log`; the session fixture's model
    is trained once into a temporary cache that every mutant's pytest session reads."""
    with tempfile.TemporaryDirectory(prefix="cdm-mutants-cache-") as cache:
        env = os.environ | {"CDM_OOD_TEST_CACHE": cache, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                            "CDM_OOD_MLFLOW": "false"}  # fmt: skip
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as plain, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE) as proc:
            pending, last = "", ""
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                *lines, pending = re.split(r"[\r\n]", pending + chunk.decode(errors="replace"))
                for line in lines:  # the spinner's frames left out: one line per change of the counts
                    text = SPINNER.sub("", line).strip()
                    if text and text != last:
                        plain.write(f"{datetime.datetime.now():%H:%M:%S} {text}\n")
                        plain.flush()
                        last = text
        if proc.returncode != 0:
            sys.exit(f"mutmut run failed (exit {proc.returncode}); its output is in {log}")


def results() -> Iterator[tuple[str, Any]]:
    """Each listed module's path and mutmut's results for it (`SourceFileMutationData`, read from mutants/)."""
    from mutmut.mutation.data import SourceFileMutationData

    for path in mutated_files():
        data = SourceFileMutationData(path=path)
        data.load()
        yield path, data


def statuses() -> dict[str, dict[str, str]]:
    """Each listed module's mutants and their status (mutmut's words: killed, survived, no tests, timeout, ...),
    read from the last run's results under mutants/."""
    from mutmut.stats import status_by_exit_code

    return {path: {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
            for path, data in results()}  # fmt: skip


def function_of(name: str) -> str:
    """The dotted name of the function a mutmut mutant changes: `cdm_ood.ood.report.x_judge__mutmut_3` ->
    `cdm_ood.ood.report.judge`, `cdm_ood.ood.detectors.xǁDetectorǁfit__mutmut_1` -> `...detectors.Detector.fit`."""
    module, _, mangled = name.rpartition(".")
    mangled = mangled.rpartition("__mutmut_")[0]
    return ".".join([module, *(mangled[2:].split("ǁ") if mangled.startswith("xǁ") else [mangled.removeprefix("x_")])])


def forget_survivors() -> int:
    """Mark every mutant of the last run that was not killed and that no reviewed entry explains as unchecked, so
    that the next `mutmut run` checks it against the tests as they are now; the number marked. Killed and reviewed
    mutants keep their result (a test added cannot revive one, and mutmut itself re-runs every function whose
    source changed)."""
    _, unexplained, _ = review(statuses(), load_equivalent())
    names = {m.name for m in unexplained}
    for _, data in results():
        for name in names & set(data.exit_code_by_key):
            data.exit_code_by_key[name] = None
        data.save()
    return len(names)


def survivor(name: str, status: str, path: str) -> Survivor:
    """A mutant that was not killed, with its diff and the function it changes."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path)
    changed = [line for line in diff.splitlines()[2:] if line[:1] in "+-"]
    return Survivor(name, status, function_of(name), tuple(line[1:].strip() for line in changed if line[0] == "-"),
                    tuple(line[1:].strip() for line in changed if line[0] == "+"), diff)  # fmt: skip


def load_equivalent(folder: Path = EQUIVALENT) -> list[dict[str, str]]:
    """The reviewed equivalent mutants of every module (one file each in `folder`): each a function, the line
    before (`old`) and after (`new`), and a reason."""
    files = sorted(folder.glob("*.toml"))
    entries = [entry for path in files for entry in tomllib.loads(path.read_text()).get("equivalent", [])]
    for entry in entries:
        if set(entry) != {"function", "old", "new", "reason"} or not entry["reason"].strip():
            sys.exit(f"{folder}: each entry needs function, old, new and a reason: {entry}")
    return entries


def explain(names: list[str], reason: str) -> None:
    """Add a reviewed entry for each named survivor of the last run, with `reason`, to its module's file."""
    import json

    by_name = {n: (s, p) for p, by in statuses().items() for n, s in by.items()}
    for name in names:
        if name not in by_name or by_name[name][0] in KILLED:
            sys.exit(f"{name}: not a survivor of the last run")
        mutant = survivor(name, *by_name[name])
        path = EQUIVALENT / f"{Path(by_name[name][1]).with_suffix('').as_posix().replace('/', '.')}.toml"
        if not path.exists():
            path.write_text(f"# Reviewed equivalent mutants of {by_name[name][1]} (`make mutants`).\n")
        with open(path, "a") as f:
            f.write(f"\n[[equivalent]]\nfunction = {json.dumps(mutant.function)}\n"
                    f"old = {json.dumps(chr(10).join(mutant.old), ensure_ascii=False)}\n"
                    f"new = {json.dumps(chr(10).join(mutant.new), ensure_ascii=False)}\n"
                    f"reason = {json.dumps(reason, ensure_ascii=False)}\n")  # fmt: skip


def function_lines(function: str, root: Path = ROOT) -> list[str] | None:
    """The stripped source lines of `function` (a dotted name: module, then class and function), or None when
    there is no such function."""
    parts = function.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        path = root.joinpath(*parts[:cut]).with_suffix(".py")
        if path.is_file():
            break
    else:
        return None
    text = path.read_text()
    node: ast.AST = ast.parse(text)
    for name in parts[cut:]:
        inner = [n for n in ast.iter_child_nodes(node) if getattr(n, "name", None) == name]
        if not inner:
            return None
        node = inner[0]
    return [line.strip() for line in text.splitlines()[node.lineno - 1 : node.end_lineno]]


def check_equivalent(entries: list[dict[str, str]], root: Path = ROOT) -> list[str]:
    """One problem per reviewed entry whose function is gone or no longer holds its line (run by make test, so
    the list cannot go stale between mutation runs)."""
    problems = []
    for entry in entries:
        lines = function_lines(entry["function"], root)
        if lines is None:
            problems.append(f"{entry['function']}: no such function")
        elif missing := [line for line in stripped(entry["old"]) if line not in lines]:
            problems.append(f"{entry['function']}: no line {missing[0]!r}")
    return problems


def matches(entry: dict[str, str], mutant: Survivor) -> bool:
    """Whether a reviewed entry describes this survivor (same function, same changed lines)."""
    return (entry["function"], stripped(entry["old"]), stripped(entry["new"])) == (
        mutant.function, mutant.old, mutant.new)  # fmt: skip


def stripped(text: str) -> tuple[str, ...]:
    """An entry's lines as a survivor holds them."""
    return tuple(line.strip() for line in text.strip().splitlines())


def review(found: dict[str, dict[str, str]], entries: list[dict[str, str]]) -> tuple[list[list], list, list]:
    """The table's rows (one per module and the total), the unexplained survivors, and the stale entries (those
    that match no survivor)."""
    rows, unexplained, used = [], [], set()
    for path, by_name in found.items():
        counts = Counter(by_name.values())
        equivalent = 0
        for name, status in by_name.items():
            if status in (*KILLED, "not checked"):
                continue
            mutant = survivor(name, status, path)
            hits = [i for i, entry in enumerate(entries) if matches(entry, mutant)]
            used.update(hits)
            equivalent += bool(hits)
            if not hits:
                unexplained.append(mutant)
        killed = counts["killed"] + counts["timeout"]
        left = len(by_name) - killed - equivalent
        left -= counts["not checked"]
        rows.append([path, len(by_name), counts["killed"], counts["timeout"], counts["survived"], counts["no tests"],
                     equivalent, left, counts["not checked"], killed, len(by_name) - equivalent])  # fmt: skip
    total = ["all", *(sum(r[i] for r in rows) for i in range(1, len(rows[0])))] if rows else []
    stale = [entry for i, entry in enumerate(entries) if i not in used]
    return [*rows, total], unexplained, stale


def table(rows: list[list]) -> str:
    """The markdown table: per module, the mutants and what became of them, and the mutation score (killed over
    the mutants that can change behaviour)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tables import markdown

    header = ("module", "mutants", "killed", "timed out", "survived", "no test reaches it", "equivalent (reviewed)",
              "unexplained", "not run", "score")  # fmt: skip
    return markdown(header, ([f"`{r[0]}`", *r[1:9], f"{r[9] / r[10]:.1%}" if r[10] else "-"] for r in rows))


def show(mutants: list[Survivor]) -> None:
    for mutant in mutants:
        print(f"\n# {mutant.name}: {mutant.status} ({mutant.function})\n{mutant.diff}")


def report(seconds: float | None, command: str = "make mutants") -> int:
    """Print the table (and, after a run, splice it into docs/) and every unexplained survivor and stale entry;
    1 when there is one, or when mutants were left unchecked (an interrupted run: its stale entries are not
    judged)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from evidence import commit, machine, write_docs

    rows, unexplained, stale = review(statuses(), load_equivalent())
    unchecked = rows[-1][8] if rows else 0
    stale = [] if unchecked else stale
    text = table(rows)
    if seconds is not None:
        minutes, secs = divmod(round(seconds), 60)
        when = datetime.date.today().isoformat()
        text += (f"\n\n*Printed by `{command}` ({minutes} min {secs} s) on {machine()}, {when}, commit {commit()}; "
                 f"mutmut {version('mutmut')}.*")  # fmt: skip
        if "mutants" not in write_docs({"mutants": text}):
            sys.exit(f"docs/{DOC} has no block `mutants` to write the table into")
    print(f"<!-- table: mutants -->\n{text}\n<!-- /table -->")
    show(unexplained)
    for entry in stale:
        print(f"stale entry in {EQUIVALENT.name}/ (no such survivor): {entry['function']}: {entry['old']!r}")
    print(f"{len(unexplained)} unexplained survivors, {len(stale)} stale entries, {unchecked} mutants not run")
    return 1 if unexplained or stale or unchecked else 0


def version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="the last run's table and survivors, running nothing")
    parser.add_argument("--survivors", nargs="*", metavar="MODULE",
                        help="every mutant checked and not killed (of these modules), with its diff")  # fmt: skip
    parser.add_argument("--hand", nargs="*", metavar="NAME", help="only the hand-made mutants (or these)")
    parser.add_argument("--again", action="store_true",
                        help="check only the last run's mutants neither killed nor explained")  # fmt: skip
    parser.add_argument("--explain", nargs="+", metavar=("REASON", "NAME"),
                        help="list these survivors as equivalent mutants, with the reason")  # fmt: skip
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    args = parser.parse_args()
    if args.explain:
        explain(args.explain[1:], args.explain[0])
        return 0
    if args.hand is not None:
        return run_hand(args.hand)
    if args.survivors is not None:
        show([survivor(n, s, p) for p, by in statuses().items() if not args.survivors or p in args.survivors
              for n, s in by.items() if s not in (*KILLED, "not checked")])  # fmt: skip
        return 0
    if args.report:
        return report(None)
    start = time.monotonic()
    if args.again:
        print(f"checking again the {forget_survivors()} mutants the last run did not kill or explain", flush=True)
    else:  # from scratch: mutmut maps a test to the functions it reaches only when the test is new to it
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    run_mutmut(args.children, ROOT / "runs" / "mutants.log")
    code = report(time.monotonic() - start, "python tools/mutants.py --again" if args.again else "make mutants")
    return code | run_hand([])


if __name__ == "__main__":
    raise SystemExit(main())
