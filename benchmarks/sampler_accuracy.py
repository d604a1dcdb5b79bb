"""Sampler accuracy on an exact mixture (the rows of tests/test_sampling.py), and the cost of a sampler step.

    python benchmarks/sampler_accuracy.py [--rows ddpm-1000,...] [--checkpoint runs/<default run>/model.pt]

Each sampler draws from the exact classifier (F_t = log p_t in closed form) of the 1D mixture
0.3 N(-0.5, 0.1^2) + 0.7 N(0.4, 0.15^2), linear schedule T = 1000, with the rows, sample counts and tolerances
that tests/test_sampling.py asserts (all in tests/exact_mixture.py); the table gives each mode's largest error in
weight, mean and relative std. The row `single-step-betas` is a strided DDPM that uses the single step's
beta_t = 1 - abar_t / abar_{t-1} for a stride t -> s (the rule the reference implementation uses), held to the
strided `ddpm` row's tolerance. With --checkpoint, also the wall time per sampler step (one forward and one
backward pass) for a batch of images of that model. Tracked in MLflow (experiment `cdm-ood-evidence`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tables import emit, markdown

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from exact_mixture import MIXTURE, ROWS, SCHEDULE, Row, draw, mixture_errors

from cdm_ood import predict_noise, predict_x0, sample
from cdm_ood.diffusion.sampling import ddpm_step, strided_levels
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.model.checkpoint import load_model

SINGLE_STEP = "single-step-betas"
STRIDED = next(r for r in ROWS if r.method == "ddpm" and r.steps < SCHEDULE.T)  # its tolerance holds SINGLE_STEP


def single_step_betas(steps: int, n: int) -> torch.Tensor:
    """A strided DDPM that steps t -> s with `ddpm_step` from t to t - 1, i.e. with the single step's beta_t
    instead of the pair's beta_{t|s}, wherever the next level s is; seed 0, shape (n, 1, 1, 1)."""
    g = torch.Generator().manual_seed(0)
    levels = strided_levels(SCHEDULE.T, steps)
    x = torch.randn(n, 1, 1, 1, generator=g)
    for t in levels[:-1]:
        x = ddpm_step(x, predict_noise(MIXTURE, x, t, SCHEDULE), t, t - 1, SCHEDULE, torch.randn(x.shape, generator=g))
    return predict_x0(predict_noise(MIXTURE, x, 1, SCHEDULE), x, 1, SCHEDULE).clamp(-1, 1)


def name(row: Row) -> str:
    return f"{row.method}-{row.steps}"


def tolerance(tol: tuple[float, float, float]) -> str:
    return f"{tol[0]:g} / {tol[1]:g} / {tol[2]:.0%}"


def accuracy(rows: list[str]) -> tuple[str, dict[str, float]]:
    """The accuracy table of `rows` (names of ROWS or SINGLE_STEP) and its numbers as MLflow metrics."""
    by_name = {name(r): r for r in ROWS}
    table, metrics = [], {}
    for key in rows:
        start = time.perf_counter()
        if key == SINGLE_STEP:
            row = STRIDED
            errors = mixture_errors(single_step_betas(row.steps, row.samples))
            passes = all(e <= t for e, t in zip(errors, row.tolerance, strict=True))
            label = "strided `ddpm` with single-step betas (the reference code's rule)"
            verdict = f"{'passes' if passes else 'fails'} {tolerance(row.tolerance)}"
        else:
            row = by_name[key]
            errors = mixture_errors(draw(row.method, row.steps, row.samples))
            strided = " (strided)" if row.method == "ddpm" and row.steps < SCHEDULE.T else ""
            label, verdict = f"`{row.method}`{strided}", tolerance(row.tolerance)
        print(f"{key}: {errors} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        table.append((label, row.steps, row.samples, f"{errors[0]:.3f}", f"{errors[1]:.3f}", f"{errors[2]:.1%}",
                      verdict))  # fmt: skip
        metrics |= {f"{key}.weight": errors[0], f"{key}.mean": errors[1], f"{key}.std": errors[2]}
    header = ("sampler", "steps", "samples", "weight", "mean", "std (relative)", "test tolerance")
    return markdown(header, table), metrics


def step_cost(checkpoint: Path, images: int, runs: list[tuple[str, int]]) -> tuple[str, dict[str, float]]:
    """One line: wall time per sampler step for `images` images of the checkpoint's model, over `runs`."""
    model = load_model(checkpoint)
    shape = (images, model.spec.channels, *model.spec.size)
    seconds = {}
    for method, steps in runs:
        start = time.perf_counter()
        sample(model.classifier, model.schedule, shape, method, steps, generator=torch.Generator().manual_seed(0))
        seconds[f"{method}-{steps}"] = time.perf_counter() - start
        print(f"{method}-{steps}: {seconds[f'{method}-{steps}']:.1f} s", file=sys.stderr, flush=True)
    per_step = sum(seconds.values()) / sum(steps for _, steps in runs)
    each = "; ".join(f"`{m}`, {s} steps: {seconds[f'{m}-{s}']:.1f} s" for m, s in runs)
    size = "x".join(map(str, shape[1:]))
    line = (
        f"Time per sampler step (one forward and one backward pass) for {images} images of {size}, "
        f"{torch.get_num_threads()} CPU threads: {per_step:.3g} s ({each}; model loaded beforehand)."
    )
    return line, {"seconds_per_step": per_step, **{f"{k}.seconds": v for k, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join([*map(name, ROWS), SINGLE_STEP]), help="Comma-separated rows.")
    parser.add_argument("--checkpoint", type=Path, help="Also time sampler steps with this model.")
    parser.add_argument("--images", type=int, default=64, help="Batch of the timed runs.")
    parser.add_argument("--cost-runs", default="ddpm-100,dpm2-25", help="Timed runs, method-steps, comma-separated.")
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the run to MLflow.")
    args = parser.parse_args()
    known = [*map(name, ROWS), SINGLE_STEP]
    rows = args.rows.split(",")
    if unknown := sorted(set(rows) - set(known)):
        parser.error(f"unknown rows {unknown}; expected some of {known}")
    table, metrics = accuracy(rows)
    emit("sampler-accuracy", table)
    if args.checkpoint is not None:
        runs = [(m, int(s)) for m, s in (r.rsplit("-", 1) for r in args.cost_runs.split(","))]
        line, cost = step_cost(args.checkpoint, args.images, runs)
        emit("sampler-step-cost", line)
        metrics |= cost
    if not args.no_tracking:
        params = {"benchmark": "sampler-accuracy", **vars(args), "checkpoint": str(args.checkpoint)}
        log_job_run("evidence", params, metrics, [])


if __name__ == "__main__":
    main()
