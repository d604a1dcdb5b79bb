"""What one trained CDM says about an image besides log p_0(x): the statistics the detectors are fitted on.

Pure functions of a classifier callable and a model-space batch x (B, C, *spatial), each citing the equation it
uses, with its cost per image in forward-pass equivalents (a backward pass costs about two forward passes):
- `log_likelihood_profile` (Theorem 3.2): log p_t(x) for t = 0..T+1, 1 forward pass.
- `denoising_residuals` (Theorem 3.1): how well the gradient denoiser recovers a fixed noise draw added to x at a
  few levels, per pixel and signed; 3 per level (one batched forward + backward over the levels).
- `class_log_likelihoods` (Theorem 3.2 with labels): log p_0(x | y) for every label y, 1 per label (one batched
  pass); Bayes' rule turns it into the generative classifier p(y | x) (`class_posterior`).
- `flip_log_likelihoods`: log p_0(flip x) for each spatial axis, 1 per axis: with log p_0(x), how much more likely
  the scan is as given than mirrored (a scan stored upside down is more likely the right way up).
- `transpose_log_likelihoods`: log p_0 of the image with its last two axes swapped, 1: with log p_0(x), how much
  more likely the scan is as given than transposed (with a flip, rotated by 90 degrees).
- `foreground_statistics`: how much of each slice the body fills and its shape, 0: read from x alone (the
  whole-anatomy check's coverage, `anatomy_check`).
- `extreme_pixels`: where x is at the top of its range or a hole in the body, 0: read from x alone (where the
  `foreign` check reads the anomaly map, `local_check`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..diffusion.denoiser import Classifier, logits_and_noise
from ..diffusion.likelihood import log_likelihood_profile
from ..diffusion.schedules import NoiseSchedule, diffuse

if TYPE_CHECKING:
    from ..model.spec import ModelSpec

NOISE_SEED = 0  # of the noise draw shared by every image, so a pixel's error is comparable across images
DENOISE_FRACTIONS = (0.05, 0.1)  # noise levels t / T of the denoiser residuals (chosen on development sets)
FEATURES = ("profile", "residuals", "flips", "transpose", "class_ll", "foreground", "extremes")
FOREGROUND_LEVEL = -0.8
"""Model-space value above which a pixel is body, not background: a tenth of the way up the fixed preset's range
[-1, 1] (-800 HU in the CT window; in MR, below cerebrospinal fluid and well above the background's noise)."""
MAX_SKEWNESS = 3.0  # |skewness| of a slice's body above this comes from a handful of pixels, not from anatomy
TOP_LEVEL = 0.98
"""Model-space value at or above which a pixel is at the top of the preset's range: the brightest 0.5% of the `mr`
preset's training intensities and above (clipped to 1), +960 HU and above in the CT window (dense bone, metal)."""


def level_indices(schedule: NoiseSchedule, fractions: Sequence[float]) -> list[int]:
    """Noise levels t = round(f T) (at least 1) for fractions f of the schedule's T."""
    return [max(1, min(schedule.T, round(f * schedule.T))) for f in fractions]


def fixed_noise(shape: Sequence[int], seed: int = NOISE_SEED) -> Tensor:
    """The float32 N(0, I) draw of one image's shape that every image is noised with (reproducible anywhere)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def denoising_residuals(
    classifier: Classifier,
    x: Tensor,
    schedule: NoiseSchedule,
    levels: Sequence[int],
    labels: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """Per-pixel signed residuals (B, K, C, *spatial) of the gradient denoiser at the K noise `levels`:
    eps_hat(x_t, t) - eps with x_t = sqrt(abar_t) x + sigma_t eps (eq. 8 for eps_hat, Theorem 3.1).

    eps is `noise` (default `fixed_noise` of one image, shared by all) so an in-distribution image's squared residual
    is a draw of the training MSE at that level, and a pixel's residual is comparable across images. The mean square
    over pixels at level t is one Monte Carlo term of the variational bound, the statistic behind the DDPM bound's OOD
    scores; the sign tells which way the denoiser pulls the pixel. One forward and one backward pass over the B K
    noised images.
    """
    eps = (fixed_noise(x.shape[1:]) if noise is None else noise).to(device=x.device, dtype=x.dtype)
    k = len(levels)
    t = torch.tensor(levels, device=x.device).repeat_interleave(x.shape[0])
    x_t = diffuse(x.repeat(k, *([1] * (x.ndim - 1))), t, eps.expand(k * x.shape[0], *eps.shape), schedule)
    repeated = None if labels is None else labels.repeat(k)
    _, eps_hat = logits_and_noise(classifier, x_t, t, schedule, repeated)
    return (eps_hat - eps).reshape(k, *x.shape).transpose(0, 1)


def class_log_likelihoods(classifier: Classifier, x: Tensor, schedule: NoiseSchedule, num_classes: int) -> Tensor:
    """log p_0(x | y) (B, num_classes) in nats for every label y (eq. 10 of the class-conditional F(x | y)), from one
    forward pass over the B num_classes image-label pairs."""
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(x.shape[0])
    profile = log_likelihood_profile(classifier, x.repeat(num_classes, *([1] * (x.ndim - 1))), schedule, labels)
    return profile[:, 0].reshape(num_classes, x.shape[0]).T


def class_posterior(class_ll: Tensor, log_prior: Optional[Tensor] = None) -> Tensor:
    """Bayes' rule: log p(y | x) = log p(x | y) + log p(y) - log sum_y' p(x | y') p(y'), (B, K); uniform prior by
    default."""
    if log_prior is None:
        log_prior = torch.full((class_ll.shape[1],), -math.log(class_ll.shape[1]), dtype=class_ll.dtype)
    joint = class_ll + log_prior.to(class_ll)
    return joint - joint.logsumexp(dim=1, keepdim=True)


def flip_log_likelihoods(classifier: Classifier, x: Tensor, schedule: NoiseSchedule) -> Tensor:
    """log p_0(flip_a x) (B, A) in nats for each spatial axis a (eq. 10 at t = 0), from one forward pass over the A
    mirror images; with log p_0(x) from the profile, the log-ratio of the scan as given to the scan mirrored."""
    axes = range(2, x.ndim)
    ll = log_likelihood_profile(classifier, torch.cat([x.flip(a) for a in axes]), schedule)[:, 0]
    return ll.reshape(len(axes), x.shape[0]).T


def transpose_log_likelihoods(classifier: Classifier, x: Tensor, schedule: NoiseSchedule) -> Tensor:
    """log p_0 (B, 1) in nats of each image with its last two axes swapped (eq. 10 at t = 0), one forward pass; only
    for images whose last two axes have the same size (a transposed image must fit the model)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"cannot transpose images of shape {tuple(x.shape[1:])}: their last two axes differ")
    return log_likelihood_profile(classifier, x.transpose(-1, -2), schedule)[:, :1]


def foreground_statistics(x: Tensor, level: float = FOREGROUND_LEVEL) -> Tensor:
    """(B, 3) per image of a model-space batch (B, C, H, W), channels averaged, from its body (the pixels above
    `level`): the fraction of the image it fills; its elongation, (s_r - s_c) / (s_r + s_c) for s_r and s_c the
    standard deviations of its pixels' row and column coordinates (0 for a disc, in [-1, 1]); and its asymmetry
    along the rows, the skewness of their row coordinates clipped to [-`MAX_SKEWNESS`, `MAX_SKEWNESS`] (in an axial
    slice, positive when the body's bulk lies towards the first rows). Both are bounded, so that a slice with a
    handful of body pixels (noise at the edge of the anatomy) cannot dominate a volume's mean; size and position do
    not change them, a flip of the rows negates the skewness; an image with fewer than 2 body pixels has 0 for both."""
    if x.ndim != 4:
        raise ValueError(f"foreground statistics are of 2D images (B, C, H, W), got shape {tuple(x.shape)}")
    body = (x.double().mean(dim=1) > level).double()
    count = body.sum(dim=(1, 2))
    rows = torch.arange(x.shape[2], dtype=torch.float64, device=x.device)[:, None].expand(x.shape[2:])
    cols = torch.arange(x.shape[3], dtype=torch.float64, device=x.device)[None, :].expand(x.shape[2:])

    def central_moment(coordinate: Tensor, order: int) -> Tensor:
        mean = (body * coordinate).sum(dim=(1, 2)) / count.clamp_min(1)
        return (body * (coordinate - mean[:, None, None]) ** order).sum(dim=(1, 2)) / count.clamp_min(1)

    row_sd, col_sd = central_moment(rows, 2).sqrt(), central_moment(cols, 2).sqrt()
    some = count >= 2
    elongation = torch.where(some, (row_sd - col_sd) / (row_sd + col_sd).clamp_min(1e-12), 0.0)
    skewness = central_moment(rows, 3) / row_sd.clamp_min(1e-6) ** 3
    skewness = torch.where(some, skewness.clamp(-MAX_SKEWNESS, MAX_SKEWNESS), 0.0)
    return torch.stack([count / (x.shape[2] * x.shape[3]), elongation, skewness], dim=1)


def extreme_pixels(x: Tensor, level: float = FOREGROUND_LEVEL, top: float = TOP_LEVEL) -> Tensor:
    """(B, H, W) per image of a model-space batch (B, C, H, W), channels averaged: 1 where a pixel is at the top of
    the range (at or above `top`: a foreign object, metal, the rim of a signal void) or a hole in the body (below
    `level` and enclosed by body: a signal void; MONAI's `FillHoles`), and the pixels next to them (a 3 x 3
    neighbourhood: the map is smoothed over a few pixels); 0 elsewhere."""
    from monai.transforms import FillHoles

    if x.ndim != 4:
        raise ValueError(f"extreme pixels are of 2D images (B, C, H, W), got shape {tuple(x.shape)}")
    mean = x.double().mean(dim=1)
    body = (mean > level).cpu()
    fill = FillHoles()  # it fills its input in place: give it a copy
    holes = torch.stack([fill(b[None].clone()).as_tensor()[0] & ~b for b in body]) if len(body) else body
    extreme = ((mean >= top).cpu() | holes).float()
    return torch.nn.functional.max_pool2d(extreme[:, None], 3, stride=1, padding=1)[:, 0].to(x.device)


def compute_features(
    classifier: Classifier, x: Tensor, schedule: NoiseSchedule, needs: Iterable[str], num_classes: Optional[int] = None
) -> dict[str, Tensor]:
    """The features named in `needs` (of `FEATURES`) of a model-space batch, on the device of `x`: `profile` (B, T+2),
    `residuals` (B, K, C, *spatial) at the `DENOISE_FRACTIONS` levels, `flips` (B, A) log p_0 of the mirrored images,
    `transpose` (B, 1) of the transposed ones, `class_ll` (B, num_classes), `foreground` (B, 3) and `extremes`
    (B, *spatial) (these two without a network pass)."""
    out: dict[str, Tensor] = {}
    for name in dict.fromkeys(needs):
        if name == "profile":
            out[name] = log_likelihood_profile(classifier, x, schedule)
        elif name == "residuals":
            out[name] = denoising_residuals(classifier, x, schedule, level_indices(schedule, DENOISE_FRACTIONS))
        elif name == "flips":
            out[name] = flip_log_likelihoods(classifier, x, schedule)
        elif name == "transpose":
            out[name] = transpose_log_likelihoods(classifier, x, schedule)
        elif name == "class_ll" and num_classes:
            out[name] = class_log_likelihoods(classifier, x, schedule, num_classes)
        elif name == "foreground":
            out[name] = foreground_statistics(x)
        elif name == "extremes":
            out[name] = extreme_pixels(x)
        else:
            raise ValueError(f"feature {name!r} is not one of {FEATURES} for this model (num_classes={num_classes})")
    return out


def feature_cost(name: str, spatial_dims: int, num_classes: Optional[int] = None) -> float:
    """Forward-pass equivalents per image (a backward pass counts as two forward passes): profile 1, denoising
    residuals 3 per level, flips 1 per spatial axis, transpose 1, class likelihoods 1 per label, foreground and
    extremes 0."""
    costs = {"profile": 1.0, "residuals": 3.0 * len(DENOISE_FRACTIONS), "flips": float(spatial_dims), "transpose": 1.0,
             "class_ll": float(num_classes or 0), "foreground": 0.0, "extremes": 0.0}  # fmt: skip
    return costs[name]


def empty_features(needs: Sequence[str], n: int, spec: ModelSpec, schedule: NoiseSchedule) -> dict[str, Tensor]:
    """NaN features of `n` images of the model `spec` (the rows of images that are not scored)."""
    shapes = {"profile": (schedule.num_classes,), "residuals": (len(DENOISE_FRACTIONS), spec.channels, *spec.size),
              "flips": (len(spec.size),), "transpose": (1,), "class_ll": (spec.model.num_classes or 0,),
              "foreground": (3,), "extremes": tuple(spec.size)}  # fmt: skip
    return {k: torch.full((n, *shapes[k]), float("nan"), dtype=torch.float64) for k in needs}


def concat_features(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Row-wise concatenation of feature dicts with the same keys."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def select_rows(features: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The rows `rows` (a boolean mask or indices) of every feature."""
    return {k: v[rows] for k, v in features.items()}


def finite_rows(features: dict[str, Tensor]) -> Tensor:
    """A boolean mask of the images whose every feature is finite (the scored ones)."""
    masks = [torch.isfinite(v.flatten(1)).all(dim=1) for v in features.values()]
    return torch.stack(masks).all(dim=0)


def batched_features(
    classifier: Classifier,
    batches: Iterable[Tensor],
    schedule: NoiseSchedule,
    needs: Sequence[str],
    num_classes: Optional[int] = None,
    device: Optional[torch.device | str] = None,
) -> dict[str, Tensor]:
    """`compute_features` of every model-space batch (each moved to `device` when given), concatenated on the CPU."""
    return concat_features([
        {k: v.cpu() for k, v in compute_features(classifier, x if device is None else x.to(device), schedule, needs,
                                                 num_classes).items()}
        for x in batches
    ])  # fmt: skip
