"""Choose the prior weight beta of `candidate-posterior` (what `auto` is under an operator) on development images.

    cdm-ood make-phantoms --out-dir runs/evidence/brain/development --n 2 --format nifti --anatomy brain \\
        --size 64 --slices 24 --seed 98
    python benchmarks/prior_weight.py --model runs/evidence/mnist/model.pt=mnist \\
        --model runs/evidence/demo/run/model.pt --model runs/evidence/brain/run/model.pt=runs/evidence/brain/development

Each --model is a checkpoint and its development images: `mnist` (the bundled validation split), a folder of
development scans (the brain subjects above: seed 98, where training used 0 and the reported table 99), or nothing
(generated phantoms of seed 12; the tables use 11); `ranking.held_out(..., development=True)`. For each model,
degradation with an operator (under noise `auto` is `expected-mse`, which has no prior term) and beta,
`ranking.prior_weight_sweep` gives `candidate-posterior`'s mean tau PSNR over the candidate families but the
held-out one, and the rates of every hallucination below the truth and of the truth first. The choice: of the
weights that never rank a hallucination above the truth on any model and degradation, the one with the best worst
tau (ties: the larger, nearer Bayes' rule); with none, the best worst hallucination rate, then tau. Development
numbers are printed as lines, never as a table: docs/ranking.md states only the choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from ranking import held_out, prior_weight_sweep

from cdm_ood.diffusion.ranking import PRIOR_WEIGHT
from cdm_ood.model.checkpoint import load_model


def choose(worst: dict[float, tuple[float, float]]) -> float:
    """The weight whose worst (hallucination-below-truth rate, tau) is best: a rate of 1 first, then tau, then
    the larger weight."""
    return max(worst, key=lambda beta: (worst[beta][0] == 1, worst[beta][0], worst[beta][1], beta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="CHECKPOINT[=DATA]",
                        help="a checkpoint and its development data: 'mnist', a folder of development scans, or "
                        "nothing for generated phantoms of another seed; repeat for every model")  # fmt: skip
    parser.add_argument("--images", type=int, default=16, help="development images per model")
    parser.add_argument("--prior-weights", default="1,0.75,0.5,0.25,0", help="comma-separated candidates for beta")
    args = parser.parse_args()
    weights = [float(w) for w in args.prior_weights.split(",")]
    worst = {beta: (1.0, 1.0) for beta in weights}
    for spec in args.model:
        checkpoint, _, data = spec.partition("=")
        torch.manual_seed(0)
        model = load_model(Path(checkpoint))
        images, cases = held_out(model, data or None, args.images, development=True)
        for (degradation, beta), (tau, below, first) in prior_weight_sweep(model, images, cases, weights).items():
            print(f"development {checkpoint} | {degradation} | prior weight {beta:g}: tau PSNR all {tau:.3f}, "
                  f"hallucination below truth {below:.2f}, truth first {first:.2f}", flush=True)  # fmt: skip
            worst[beta] = (min(worst[beta][0], below), min(worst[beta][1], tau))
    for beta, (below, tau) in worst.items():
        print(f"worst over models and degradations, prior weight {beta:g}: tau PSNR all {tau:.3f}, "
              f"hallucination below truth {below:.2f}")  # fmt: skip
    chosen = choose(worst)
    agrees = "the same" if chosen == PRIOR_WEIGHT else "different: set it to the choice"
    print(f"chosen prior weight: {chosen:g} (cdm_ood.diffusion.ranking.PRIOR_WEIGHT is {PRIOR_WEIGHT:g}, {agrees})")


if __name__ == "__main__":
    main()
