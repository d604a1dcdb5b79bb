"""How well each ranking criterion orders restoration candidates by their true quality.

    python benchmarks/ranking.py --checkpoint demo/run/model.pt [--data scans/] [--images 32]

Held-out images (generated CT phantoms at the model's size, or the slices under --data), each degraded
(Gaussian noise at three sigmas; blur + weak noise), with candidates of known quality: the clean image with
added noise (0 to 0.2) or blur (0.5 to 2 px), Gaussian filtering of the observation, the observation itself,
and (for noise) the CDM's one-step MMSE denoiser. For each image, Kendall's tau between a criterion's scores
and the candidates' PSNR (and SSIM) to the clean image; the table gives the mean over images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.layers import GaussianFilter
from scipy.stats import kendalltau

from cdm_ood.checkpoint import load_model
from cdm_ood.data import iter_slices
from cdm_ood.data.phantoms import make_phantoms
from cdm_ood.ranking import rank_restorations
from cdm_ood.sampling import denoise

DEGRADATIONS = {"noise 0.05": (None, 0.05), "noise 0.1": (None, 0.1), "noise 0.2": (None, 0.2),
                "blur 1px + noise 0.02": (1.0, 0.02)}  # fmt: skip


def held_out(model, data: Path | None, n: int) -> torch.Tensor:
    transform = model.spec.input_transform()
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = Path(tmp) / "phantoms"
            make_phantoms(data, max(1, n // 8), "nifti", size=model.spec.size[-1], slices=16, seed=11)
        slices = [s for s in iter_slices(data, on_error=lambda e: None) if not s.flags]
    step = max(1, len(slices) // n)
    return torch.stack([transform(s.image) for s in slices[::step][:n]])


def candidates(model, x: torch.Tensor, y: torch.Tensor, blur_px: float | None, sigma: float, g) -> torch.Tensor:
    noisy = [x + tau * torch.randn(x.shape, generator=g) for tau in (0.0, 0.02, 0.05, 0.1, 0.2)]
    blurred = [GaussianFilter(2, s)(x[None])[0] for s in (0.5, 1.0, 2.0)]
    filtered = [GaussianFilter(2, s)(y[None])[0] for s in (0.5, 1.0)]
    made = [] if blur_px else [denoise(model.classifier, y[None], model.schedule, sigma)[0].clamp(-1, 1)]
    return torch.stack([*noisy, *blurred, *filtered, y, *made]).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    images = held_out(model, args.data, args.images)
    psnr, ssim = PSNRMetric(max_val=2.0, reduction="none"), SSIMMetric(spatial_dims=2, data_range=2.0,
                                                                       reduction="none", win_size=7)  # fmt: skip
    print(f"{len(images)} held-out images of {tuple(images.shape[1:])}; Kendall tau with the true quality (mean)")
    print(f"{'degradation':<24}{'criterion':<10}{'tau PSNR':>10}{'tau SSIM':>10}")
    g = torch.Generator().manual_seed(0)
    for name, (blur_px, sigma) in DEGRADATIONS.items():
        op = GaussianFilter(2, blur_px) if blur_px else None
        taus: dict[str, list[tuple[float, float]]] = {"prior": [], "map": []}
        for x in images:
            clean = x if op is None else op(x[None])[0]
            y = clean + sigma * torch.randn(x.shape, generator=g)
            cands = candidates(model, x, y, blur_px, sigma, g)
            truth_p = psnr(cands, x.expand_as(cands)).flatten().numpy()
            truth_s = ssim(cands, x.expand_as(cands)).flatten().numpy()
            for criterion in taus:
                scores = rank_restorations(model.classifier, model.schedule, cands, y, criterion, sigma, op).scores
                taus[criterion].append((kendalltau(scores, truth_p)[0], kendalltau(scores, truth_s)[0]))
        for criterion, values in taus.items():
            tp = statistics.fmean(v[0] for v in values if np.isfinite(v[0]))
            ts = statistics.fmean(v[1] for v in values if np.isfinite(v[1]))
            print(f"{name:<24}{criterion:<10}{tp:>10.3f}{ts:>10.3f}")


if __name__ == "__main__":
    main()
