"""How well each ranking criterion orders restoration candidates by their true quality.

    python benchmarks/ranking.py --checkpoint runs/mnist/model.pt --data mnist --images 16
    python benchmarks/ranking.py --checkpoint demo/run/model.pt --images 16

Held-out images (the bundled MNIST test split with `--data mnist`; generated CT phantoms at the model's size by
default; or the slices under a folder), each degraded by every entry of DEGRADATIONS. The candidates come from
FAMILIES, fixed before any criterion was tuned; the family HELD_OUT is kept out of every choice (the criterion
chosen is the best mean tau over the other families among those that meet GOAL on every degradation) and
reported on its own. For each image, Kendall's tau between a criterion's scores and the candidates' PSNR
(equivalently minus their MSE) and SSIM to the clean image, over the truth plus the candidates of all families but
the held-out one ("all"), of all families ("+ held-out"), of the METHODS families alone (no truth, nothing made
from it: what a user ranks) and of each family with the truth; the rate at which the truth is ranked first and at
which every hallucination (a clean image of another case, `another_case`) is ranked below the truth. Tables are
means over images, printed as the block --name of `tables.emit`. `benchmarks/prior_weight.py` chooses the prior
weight on development images with `prior_weight_sweep`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.networks.layers import GaussianFilter
from scipy.stats import kendalltau
from tables import emit

from cdm_ood.data import iter_slices
from cdm_ood.data.natural import bundled_mnist
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.diffusion.ranking import rank_restorations
from cdm_ood.diffusion.sampling import denoise
from cdm_ood.model.checkpoint import load_model

CRITERIA = ("auto", "expected-mse", "candidate-posterior", "map", "prior")
GOAL = 0.85  # issue 17: tau PSNR >= GOAL on every degradation, and no hallucination ranked above the truth
HELD_OUT = "contrast"
METHODS = ("classical", "learned", "hallucination")  # candidates made without the truth: restoration methods
MASKED = 0.3


def blur(px: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return GaussianFilter(2, px)


def mask_operator(keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x[..., keep]


# name -> (kind, parameter, sigma of the observation noise)
DEGRADATIONS = {
    "noise 0.05": ("noise", None, 0.05),
    "noise 0.1": ("noise", None, 0.1),
    "noise 0.2": ("noise", None, 0.2),
    "noise 0.5": ("noise", None, 0.5),
    "blur 1.5 px + noise 0.05": ("blur", 1.5, 0.05),
    "down 4x + noise 0.05": ("down", 4, 0.05),
    f"mask {MASKED:.0%} + noise 0.05": ("mask", MASKED, 0.05),
}


def held_out(model, data: Optional[str], n: int, development: bool = False) -> tuple[torch.Tensor, list[str]]:
    """n + 1 model-space images and the case (volume) of each; the last image only lends its content to the
    hallucinations of the others. Generated phantoms come in at least two volumes, one case for each. With
    `development`, images that no reported table uses: MNIST's validation split, phantoms of another seed."""
    transform = model.spec.input_transform()
    if data == "mnist":
        test = bundled_mnist("val" if development else "test")
        samples = test[:: max(1, len(test) // (n + 1))][: n + 1]
        return torch.stack([transform(s["image"]) for s in samples]), [str(k) for k in range(len(samples))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(data) if data else Path(tmp) / "phantoms"
        if data is None:
            make_phantoms(folder, max(2, (n + 1) // 8 + 1), "nifti", size=model.spec.size[-1], slices=16,
                          seed=12 if development else 11)  # fmt: skip
        slices = [s for s in iter_slices(folder, on_error=lambda e: None) if not s.flags]
    picked = slices[:: max(1, len(slices) // (n + 1))][: n + 1]
    return torch.stack([transform(s.image) for s in picked]), [s.source.volume_id for s in picked]


def another_case(cases: list[str], i: int) -> int:
    """The image that lends image i its hallucination: of the first other case after i (cyclically) that has an
    image at i's position within its case, else of the first other case at the nearest position. A neighbouring
    slice of the same volume would be nearly the truth, not a plausible image of another patient."""
    position = [cases[:k].count(c) for k, c in enumerate(cases)]
    others = [j % len(cases) for j in range(i + 1, i + len(cases)) if cases[j % len(cases)] != cases[i]]
    if not others:
        raise SystemExit("hallucinations need images of at least two cases (volumes)")
    same = [j for j in others if position[j] == position[i]]
    return same[0] if same else min(others, key=lambda j: abs(position[j] - position[i]))


def degrade(x: torch.Tensor, kind: str, value, sigma: float, g: torch.Generator):
    """(y, operator, x~): the observation, its operator (None: identity) and its image-space estimate (the
    observation itself, upsampled, or filled by normalised convolution) that classical and learned filters use."""
    if kind == "noise":
        y = x + sigma * torch.randn(x.shape, generator=g)
        return y, None, y
    if kind == "blur":
        op = blur(value)
        y = op(x[None])[0] + sigma * torch.randn(x.shape, generator=g)
        return y, op, y
    if kind == "down":
        op = torch.nn.AvgPool2d(value)
        small = op(x[None])[0]
        y = small + sigma * torch.randn(small.shape, generator=g)
        return y, op, torch.nn.functional.interpolate(y[None], scale_factor=value, mode="bilinear")[0]
    keep = torch.rand(x.shape[-2:], generator=g) >= value
    op = mask_operator(keep)
    y = op(x) + sigma * torch.randn(op(x).shape, generator=g)
    full = torch.zeros_like(x)
    full[..., keep] = y
    weight = blur(1.0)(keep.to(x)[None, None])[0]
    return y, op, torch.where(keep, full, blur(1.0)(full[None])[0] / weight.clamp_min(1e-3))


def families(model, x: torch.Tensor, other: torch.Tensor, estimate: torch.Tensor, kind: str, sigma: float,
             g: torch.Generator) -> dict[str, list[torch.Tensor]]:  # fmt: skip
    """The candidate families of one case (fixed before tuning). `estimate` is x~ of `degrade`."""
    levels = (0.5 * sigma, sigma, 2 * sigma) if kind == "noise" else (0.1, 0.2, 0.4)
    mean = x.mean()
    return {
        "noisy truth": [x + tau * torch.randn(x.shape, generator=g) for tau in (0.02, 0.05, 0.1, 0.2)],
        "over-smoothed": [blur(s)(x[None])[0] for s in (0.5, 1.0, 2.0)],
        "classical": [estimate, *[blur(s)(estimate[None])[0] for s in (0.7, 1.4)]],
        "learned": [denoise(model.classifier, estimate[None], model.schedule, s)[0] for s in levels],
        "shifted": [torch.roll(x, k, dims=-1) for k in (1, 2, 3)],
        "hallucination": [other, blur(1.0)(other[None])[0]],
        HELD_OUT: [mean + gain * (x - mean) for gain in (0.9, 0.75, 0.5)],
    }


def kendall(scores: np.ndarray, truth: np.ndarray) -> float:
    tau = kendalltau(scores, truth)[0]
    return float(tau) if np.isfinite(tau) else 0.0


def candidate_sets(model, images: torch.Tensor, cases: list[str], kind: str, value, sigma: float) -> Iterator[tuple]:
    """Per image but the last, under one degradation: (index, truth x, observation y, operator, family names
    with the truth first, candidates clamped to [-1, 1], -MSE to the truth: higher = better, the order of PSNR)."""
    g = torch.Generator().manual_seed(0)
    for i, x in enumerate(images[:-1]):
        y, op, estimate = degrade(x, kind, value, sigma, g)
        groups = families(model, x, images[another_case(cases, i)], estimate, kind, sigma, g)
        names = ["truth"] + [f for f, members in groups.items() for _ in members]
        cands = torch.stack([x, *[c for members in groups.values() for c in members]]).clamp(-1, 1)
        yield i, x, y, op, names, cands, -(cands - x).flatten(1).square().mean(1).numpy()


def hallucinations_below_truth(scores: np.ndarray, names: list[str]) -> float:
    """1 when every hallucination scores below the truth (index 0), else 0."""
    return float(all(scores[j] < scores[0] for j, n in enumerate(names) if n == "hallucination"))


def evaluate(model, images: torch.Tensor, cases: list[str], samples: int, steps: int) -> tuple[dict, dict]:
    """Per degradation and criterion: the mean of every measure over images; and seconds per case."""
    ssim = SSIMMetric(spatial_dims=2, data_range=2.0, reduction="none", win_size=7)
    results: dict = {}
    seconds: dict = {c: [] for c in CRITERIA}
    for name, (kind, value, sigma) in DEGRADATIONS.items():
        rows: dict[str, list[dict[str, float]]] = {c: [] for c in CRITERIA}
        for i, x, y, op, names, cands, mse in candidate_sets(model, images, cases, kind, value, sigma):
            sim = ssim(cands, x.expand_as(cands)).flatten().numpy()
            groups = dict.fromkeys(names[1:])  # the families, in their order
            for criterion in CRITERIA:
                start = time.perf_counter()
                gen = torch.Generator().manual_seed(i)
                draws = samples if op is not None else 0
                ranking = rank_restorations(model.classifier, model.schedule, cands, y, criterion, sigma, op,
                                            samples=draws, steps=steps, generator=gen)  # fmt: skip
                seconds[criterion].append(time.perf_counter() - start)
                scores = ranking.scores.numpy()
                row = {}
                for subset, members in (("all", [n != HELD_OUT for n in names]), ("+ held-out", [True] * len(names)),
                                        ("methods", [n in METHODS for n in names]),
                                        *((f, [n in ("truth", f) for n in names]) for f in groups)):  # fmt: skip
                    pick = np.array(members)
                    row[f"tau PSNR {subset}"] = kendall(scores[pick], mse[pick])
                    row[f"tau SSIM {subset}"] = kendall(scores[pick], sim[pick])
                row["truth first"] = float(ranking.order[0] == 0)
                row["hallucination below truth"] = hallucinations_below_truth(scores, names)
                rows[criterion].append(row)
        results[name] = {c: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for c, rs in rows.items()}
        print(f"{name}: done ({len(images) - 1} images)", file=sys.stderr, flush=True)
    return results, {c: statistics.fmean(v) for c, v in seconds.items()}


def prior_weight_sweep(model, images: torch.Tensor, cases: list[str], weights: list[float]) -> dict[tuple, tuple]:
    """Development only (`benchmarks/prior_weight.py`, on `held_out(..., development=True)` images): for each
    degradation with an operator and each prior weight beta, `candidate-posterior`'s mean tau PSNR over all families
    but the held-out one, and the rates of every hallucination below the truth and of the truth first."""
    found = {}
    for name, (kind, value, sigma) in DEGRADATIONS.items():
        if kind == "noise":  # `auto` is expected-mse there: no prior term
            continue
        rows: dict[float, list[tuple[float, float, float]]] = {beta: [] for beta in weights}
        for _, _, y, op, names, cands, mse in candidate_sets(model, images, cases, kind, value, sigma):
            keep = np.array([n != HELD_OUT for n in names])
            for beta in weights:
                ranking = rank_restorations(model.classifier, model.schedule, cands, y, "candidate-posterior", sigma,
                                            op, prior_weight=beta)  # fmt: skip
                scores = ranking.scores.numpy()
                rows[beta].append((kendall(scores[keep], mse[keep]), hallucinations_below_truth(scores, names),
                                   float(ranking.order[0] == 0)))  # fmt: skip
        found |= {(name, beta): tuple(statistics.fmean(v) for v in zip(*r, strict=True)) for beta, r in rows.items()}
    return found


def tables(results: dict, seconds: dict, n: int) -> str:
    subsets = [k[len("tau PSNR ") :] for k in next(iter(next(iter(results.values())).values())) if "PSNR" in k]
    families_ = [f for f in subsets if f not in ("all", "+ held-out", "methods")]
    lines = [f"{n} held-out images per degradation; means over images.", "",
             "| degradation | criterion | tau PSNR all | tau SSIM all | tau PSNR + held-out | tau PSNR methods | "
             "truth first | hallucination below truth |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, by in results.items():
        for c, r in by.items():
            lines.append(f"| {name} | {c} | {r['tau PSNR all']:.3f} | {r['tau SSIM all']:.3f} | "
                         f"{r['tau PSNR + held-out']:.3f} | {r['tau PSNR methods']:.3f} | {r['truth first']:.2f} | "
                         f"{r['hallucination below truth']:.2f} |")  # fmt: skip
    lines += ["", "Kendall tau vs PSNR per family (the truth and that family's candidates; "
              f"`{HELD_OUT}` is the held-out family):", "",
              "| degradation | criterion | " + " | ".join(families_) + " |",
              "|---|---|" + "---|" * len(families_)]  # fmt: skip
    for name, by in results.items():
        for c, r in by.items():
            lines.append(f"| {name} | {c} | " + " | ".join(f"{r['tau PSNR ' + f]:.3f}" for f in families_) + " |")

    def over_degradations(f: Callable, key: str) -> dict[str, float]:
        return {c: f(by[c][key] for by in results.values()) for c in CRITERIA}

    mean_all, worst = over_degradations(statistics.fmean, "tau PSNR all"), over_degradations(min, "tau PSNR all")
    worst_held = over_degradations(min, "tau PSNR + held-out")
    safe = over_degradations(min, "hallucination below truth")
    meets = [c for c in CRITERIA if worst[c] >= GOAL and safe[c] == 1]
    best = max(meets, key=mean_all.get) if meets else max(CRITERIA, key=worst.get)
    lines += ["", "| criterion | mean tau PSNR all | worst tau PSNR all | worst tau PSNR + held-out | "
              "hallucination below truth, worst | seconds per case (all its candidates) |", "|---|---|---|---|---|---|",
              *(f"| {c} | {mean_all[c]:.3f} | {worst[c]:.3f} | {worst_held[c]:.3f} | {safe[c]:.2f} | {seconds[c]:.2f} |"
                for c in CRITERIA), "",
              f"meet the goal on every degradation (tau PSNR all >= {GOAL}, no hallucination above the truth; the "
              f"held-out family not used): {', '.join(meets) or 'none'}",
              "chosen (the best mean tau of those that meet it, else the best worst tau): " + best]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", help="'mnist' (the bundled test split) or a folder of scans [default: phantoms]")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="posterior samples under blur, down and mask")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps of each posterior sample")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--name", default="ranking", help="name of the printed table block (tables.emit)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.checkpoint)
    images, cases = held_out(model, args.data, args.images)
    results, seconds = evaluate(model, images, cases, args.samples, args.steps)
    text = tables(results, seconds, len(images) - 1)
    emit(args.name, text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
