"""Mutation check: source changes that a correct suite must catch, each applied alone to a copy of the tree.

    python tools/mutants.py              # every mutant (minutes: each runs its tests, some train the tiny model)
    python tools/mutants.py NAME ...     # only these

The copy holds the working tree's files (`git ls-files`: tracked and untracked, less the ignored), so the check
sees uncommitted work; the working tree itself is never written. pytest runs there with this interpreter and
PYTHONPATH set to the copy (the run stops unless `cdm_ood` then imports from the copy, not from the editable
install of the original tree). The named tests first run on the unchanged copy
(they must pass), then once per mutant with its change applied; a mutant is killed when its tests fail. Prints a
table and exits 1 when a mutant survives, a test errors out, or a mutant's old text no longer occurs exactly once
in its file (the list cannot go stale silently). Run it before each release; add a mutant with each bug that a
test should have caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
BENCH = "tests/test_benchmarks.py::"


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids expected to fail with the change


MUTANTS = (
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
        "map-criterion-sign",
        "cdm_ood/diffusion/ranking.py",
        "scores = prior_weight * log_prior + log_obs",
        "scores = prior_weight * log_prior - log_obs",
        (f"{BENCH}test_ranking_measures_every_degradation_family_and_criterion",),
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
            for m in MUTANTS if (n := occurrences(m, root)) != 1]  # fmt: skip


def copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, less the ignored) into `dest`, laid out so that `cdm_ood`
    and its sub-packages kept elsewhere in the repository (pyproject's package-dir: `cli/`, `configs/`) import from
    the copy rather than through the editable install of the original tree."""
    import tomllib

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


def main(names: list[str]) -> int:
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    problems = check_texts()
    for problem in problems:
        print(problem)
    chosen = [m for m in MUTANTS if not names or m.name in names]
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
