"""`cdm-ood rank-restorations`: order candidate restorations of a degraded scan by plausibility."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import click

from cdm_ood.errors import UsageError

from .common import checkpoint_option, device_option, exit_code, open_checkpoint, setup_logging


@click.command("rank-restorations")
@click.argument("candidates", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@checkpoint_option
@click.option("--observed", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The degraded scan.")
@click.option("--criterion", default="auto", show_default=True,
              help="auto (expected-mse for noise, candidate-posterior for blur, down and mask), expected-mse, "
              "candidate-posterior, prior, map or noisy-level (`cdm_ood.diffusion.ranking.CRITERIA`).")  # fmt: skip
@click.option("--sigma", type=float, help="Noise std (model units, data in [-1, 1]) of the observation "
              "(auto, expected-mse, candidate-posterior, map) or of the candidates (noisy-level).")  # fmt: skip
@click.option("--prior-weight", type=float, show_default="cdm_ood.diffusion.ranking.PRIOR_WEIGHT",
              help="beta: map and candidate-posterior weigh log p_0 by it, beta log p_0(c) + log N(y; A c, sigma^2) "
              "(1 = Bayes' rule; below 1 trusts the model's density less than the observation; the default is "
              "chosen on development images by benchmarks/prior_weight.py).")  # fmt: skip
@click.option("--degradation", default="noise", show_default=True,
              help="noise, blur:<std in pixels>, down:<factor> (the observation is that much smaller: average "
              "pooling) or mask:<file> (non-zero = observed pixel; the others are missing).")  # fmt: skip
@click.option("--samples", default=0, show_default=True, help="Posterior samples for expected-mse's expected "
              "MSE / PSNR / SSIM columns (under blur, down or mask at least 8: E[x | y] is their mean).")  # fmt: skip
@click.option("--posterior-mean", "reference", is_flag=True, help="Write E[x | y] (expected-mse) beside the "
              "ranking and list it first, as rank 0: the reference every candidate is measured against.")  # fmt: skip
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV: case, observed, candidates (';'-separated), optional degradation and sigma.")  # fmt: skip
@click.option("--generate", default=0, show_default=True, help="Also make K candidates with the CDM denoiser "
              "(1 MMSE estimate + K-1 posterior samples) and rank them too.")  # fmt: skip
@click.option("--steps", default=50, show_default=True, help="Sampler steps of --generate and of posterior samples.")
@click.option("--seed", default=0, show_default=True, help="Seed of every posterior sample drawn.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("ranking.csv"), show_default=True,
              help="Ranking CSV (generated candidates and posterior means go to <out>_generated/).")  # fmt: skip
@device_option
def rank_restorations_command(
    candidates: tuple[Path, ...], checkpoint: Path, observed: Optional[Path], criterion: str, sigma: Optional[float],
    prior_weight: Optional[float], degradation: str, samples: int, reference: bool, manifest: Optional[Path],
    generate: int, steps: int, seed: int, out: Path, device: str,
) -> None:  # fmt: skip
    """Rank candidate restorations (DICOM, NIfTI or PNG files of one slice each) of a degraded scan.

    Criteria: auto (default) = expected-mse for the noise degradation, candidate-posterior for blur, down and
    mask; expected-mse = minus the posterior expected squared error ||c - E[x | y]||^2 / d (ranks by expected
    quality; E[x | y] in one gradient evaluation for noise, from posterior samples under blur, down or mask);
    candidate-posterior = minus the expected squared error under the posterior restricted to the candidates
    (weights p(c | y) from log p_0(c) + log N(y; A c, sigma^2), one forward pass per candidate);
    prior = log p_0(x); map = log p_0(x) + log N(y; A x, sigma^2) (prior alone favours over-smoothed candidates);
    noisy-level = the exact density of candidates that are noisy with std sigma. --prior-weight beta weighs
    log p_0 in map and candidate-posterior (a tempered prior; 1 is Bayes' rule).
    Prints and writes the ranking (best first). Exit 1 when a manifest case could not be ranked, 2 on errors.
    """
    from cdm_ood.diffusion.ranking import CRITERIA, PRIOR_WEIGHT, check_prior_weight
    from cdm_ood.jobs.ranking_cases import COLUMNS, rank_cases, read_manifest
    from cdm_ood.utils.io import write_csv_atomic

    setup_logging()
    if criterion not in CRITERIA:
        raise UsageError(f"--criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    try:  # a usage error for every case, not an error row per manifest case (exit 1)
        beta = check_prior_weight(PRIOR_WEIGHT if prior_weight is None else prior_weight)
    except ValueError as err:
        raise UsageError(f"--prior-weight: {err}") from None
    model = open_checkpoint(checkpoint, device)
    if manifest is None:
        cases = [("case", observed, list(candidates), degradation, sigma)]
    else:
        cases = read_manifest(manifest, degradation, sigma)
    bar = click.progressbar(cases, label="ranking", file=sys.stderr) if manifest else nullcontext(cases)
    with bar as items:
        generated = out.with_name(f"{out.stem}_generated")  # generated candidates and posterior means
        rows, failed = rank_cases(model, items, criterion, generate, steps, seed, generated, strict=manifest is None,
                                  samples=samples, reference=reference, prior_weight=beta)  # fmt: skip
    write_csv_atomic(out, COLUMNS, [{k: "" if r[k] is None else r[k] for k in COLUMNS} for r in rows], for_people=True)
    for r in rows:
        if r["error"]:
            click.echo(f"{r['case']}: not ranked: {r['error']}")
        else:
            click.echo(f"{r['case']} #{r['rank']} {r['score']:.2f} {r['candidate']}")
    click.echo(f"ranking: {out}")
    sys.exit(exit_code(bool(failed)))
