"""Paper App. D: the CDM log-likelihood is a normalised density, not a score.

    python benchmarks/normalisation.py [--steps 1500] [--size 8]      # CPU: a few minutes
    python benchmarks/normalisation.py --steps 20000 --size 16         # closer to the paper's budget (GPU)

A CDM trained on iid uniform data in [-1, 1] must report -log2(1/2) + 7 = 8.0 bits/dim (8-bit offset); one
trained on a known Gaussian mixture must report the mixture's exact bits/dim. Both measured on 2000 held-out
samples with `log_likelihood` (Theorem 3.2, one forward pass). Tracked in MLflow (experiment `cdm-ood-evidence`).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from quick_train import small_classifier, train_cdm
from tables import emit, markdown

from cdm_ood import NoiseSchedule, bits_per_dim, log_likelihood
from cdm_ood.integrations.tracking import log_job_run

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
STDS = torch.tensor([0.15, 0.25], dtype=torch.float64)
BATCH = 64


def slashed(values: torch.Tensor) -> str:
    return " / ".join(f"{v:g}" for v in values.tolist())


def mixture(size: int):
    """Two isotropic Gaussians with fixed random means (scale 0.4) in (1, size, size)."""
    means = 0.4 * torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
        z = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
        return (means[k] + STDS[k].view(-1, 1, 1, 1) * z).float()

    def log_density(x: torch.Tensor) -> torch.Tensor:
        d = x[0].numel()
        sq = (x.double()[:, None] - means[None]).flatten(2).square().sum(2)  # (B, K)
        comp = WEIGHTS.log() - 0.5 * d * torch.log(2 * math.pi * STDS**2) - 0.5 * sq / STDS**2
        return torch.logsumexp(comp, 1)

    return draw, log_density


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--eval", type=int, default=2000, help="Held-out samples.")
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the run to MLflow.")
    args = parser.parse_args()
    schedule = NoiseSchedule.uniform(1000)
    d = args.size**2
    draw_mix, exact_mix = mixture(args.size)
    cases = {
        "uniform": ("iid uniform on [-1, 1]", lambda n, g: 2 * torch.rand(n, 1, args.size, args.size, generator=g) - 1,
                    lambda x: torch.full((len(x),), -d * math.log(2.0), dtype=torch.float64)),
        "mixture": (f"2-component Gaussian mixture (weights {slashed(WEIGHTS)}, stds {slashed(STDS)})", draw_mix,
                    exact_mix),
    }  # fmt: skip
    rows, metrics = [], {}
    for key, (name, draw, exact) in cases.items():
        model, seconds = train_cdm(small_classifier(schedule), draw, schedule, args.steps, batch=BATCH)
        x = draw(args.eval, torch.Generator().manual_seed(123))
        with torch.no_grad():
            cdm = torch.cat([log_likelihood(model, chunk, schedule).double() for chunk in x.split(250)])
        truth = bits_per_dim(exact(x), d).mean().item()
        est = bits_per_dim(cdm, d).mean().item()
        print(f"{key}: exact {truth:.3f}, CDM {est:.3f} bits/dim, trained in {seconds:.0f} s", file=sys.stderr)
        rows.append((name, f"{truth:.3f}", f"{est:.3f}", f"{est - truth:+.3f}", f"{seconds:.0f} s"))
        metrics |= {f"{key}.exact_bpd": truth, f"{key}.cdm_bpd": est, f"{key}.train_seconds": seconds}
    budget = (
        f"{args.size}x{args.size} data, uniform schedule T = {schedule.T}, {args.steps} training steps of batch "
        f"{BATCH} per case, {args.eval} held-out samples, {torch.get_num_threads()} CPU threads."
    )
    header = ("data", "exact bits/dim", "CDM bits/dim", "difference", "training")
    emit("normalisation", budget + "\n\n" + markdown(header, rows))
    if not args.no_tracking:
        log_job_run("evidence", {"benchmark": "normalisation", **vars(args)}, metrics, [])


if __name__ == "__main__":
    main()
