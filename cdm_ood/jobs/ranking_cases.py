"""Ranking restoration cases as a job: read each case's observation and candidate files and its degradation,
rank the candidates (`ranking.rank_restorations`, the math), optionally add candidates made by the CDM denoiser
and the posterior mean, and return the ranking rows. `cdm-ood rank-restorations` calls it."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import image_transform, read_file
from ..data.discovery import detect_format
from ..data.errors import DataError
from ..data.records import FLAG_NONFINITE, describe_flags
from ..diffusion.posterior import Operator, posterior_mean, posterior_samples
from ..diffusion.ranking import PRIOR_WEIGHT, TEMPERED, expected_quality, rank_restorations, resolve_criterion
from ..errors import CdmOodError, UsageError
from ..utils.figures import save_png, to_uint8
from ..utils.io import atomic_path

Case = tuple[str, Optional[Path], list[Path], str, Optional[float]]  # name, observed, candidates, degradation, sigma

QUALITY = ("expected_mse", "expected_psnr", "expected_ssim")
COLUMNS = ("case", "rank", "candidate", "criterion", "prior_weight", "score", "log_prior", "log_observation",
           "posterior_weight", *QUALITY, "error")  # fmt: skip


class CaseError(CdmOodError):
    """A case that cannot be ranked (unreadable file, shape or preset mismatch), with the files named."""


@dataclass
class Degradation:
    """y = A(x) + sigma n as a case describes it: the operator A (None: the identity), the factor by which the
    observation file is smaller than a candidate (`down:<k>`), and the observed pixels (`mask:<file>`)."""

    operator: Optional[Operator] = None
    factor: int = 1

    def observe(self, image: torch.Tensor) -> torch.Tensor:
        """The observation y from the observation file's model-space image (the kept pixels, for a mask)."""
        return image


class Masked(Degradation):
    """`mask:<file>`: y holds the pixels where the mask is non-zero; the others are missing."""

    def observe(self, image: torch.Tensor) -> torch.Tensor:
        return self.operator(image)


DEGRADATIONS = "noise, blur:<std in pixels>, down:<factor> (average pooling) or mask:<file of observed pixels>"


def degradation_for(spec: str, model: Any) -> Degradation:
    """The `Degradation` named by `spec` (one of `DEGRADATIONS`) at the model's size, on its device."""
    kind, _, value = spec.partition(":")
    if kind == "noise" and not value:
        return Degradation()
    if kind == "mask" and value:
        return masking(Path(value), model)
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if kind == "blur" and number > 0:
        from monai.networks.layers import GaussianFilter

        return Degradation(GaussianFilter(spatial_dims=2, sigma=number).to(model.device))
    if kind == "down" and number >= 2 and number == int(number):
        k = int(number)
        if any(s % k for s in model.spec.size):
            raise UsageError(f"--degradation {spec}: the model's size {model.spec.size} is not a multiple of {k}")
        return Degradation(torch.nn.AvgPool2d(k), k)
    raise UsageError(f"--degradation {spec!r}: expected {DEGRADATIONS}")


def masking(path: Path, model: Any) -> Masked:
    """The mask file (any readable single-slice image; non-zero = observed) resized to the model's size."""
    from monai.transforms import Resize

    try:
        slices = read_file(path)
    except DataError as err:
        raise UsageError(f"--degradation mask: {err.path}: {err.reason}") from None
    if len(slices) != 1:
        raise UsageError(f"--degradation mask: {path}: holds {len(slices)} slices; give one 2D mask")
    if FLAG_NONFINITE in slices[0].flags:
        raise UsageError(f"--degradation mask: {path}: {FLAG_NONFINITE} pixels")
    image = np.asarray(slices[0].image, dtype=np.float32).reshape(1, *slices[0].image.shape[-2:])
    keep = torch.as_tensor(Resize(model.spec.size, mode="nearest")(image != 0)).bool()[0].to(model.device)
    if not keep.any():
        raise UsageError(f"--degradation mask: {path}: no observed (non-zero) pixel")
    return Masked(lambda x: x[..., keep])


def load_images(model: Any, paths: list[Path], factor: int = 1) -> tuple[torch.Tensor, tuple, str]:
    """The model-space images of single-slice files, which must share raw shape and format (hence preset), with
    that shape and format; with `factor`, at the model's size divided by it (a downsampled observation)."""
    size = [s // factor for s in model.spec.size]
    transform = image_transform(model.spec.preset, size, model.spec.channels, multiple=1)
    images, shapes, formats = [], {}, {}
    for path in paths:
        try:
            slices = read_file(path)
            formats[path] = detect_format(path)
        except DataError as err:
            raise CaseError(f"{err.path}: {err.reason}") from None
        if len(slices) != 1:
            raise CaseError(f"{path}: holds {len(slices)} slices; give one 2D image per file")
        if slices[0].flags:
            raise CaseError(f"{path}: {describe_flags(slices[0].flags)}")
        shapes[path] = slices[0].image.shape
        images.append(transform(slices[0].image))
    for label, values in (("shape", shapes), ("format (and so intensity preset)", formats)):
        if len(set(values.values())) > 1:
            first = paths[0]
            other = next(p for p in paths if values[p] != values[first])
            raise CaseError(f"{label} mismatch: {first} is {values[first]} but {other} is {values[other]}")
    return torch.stack(images).to(model.device), shapes[paths[0]], formats[paths[0]]


def load_case(
    model: Any, observed: Optional[Path], candidates: list[Path], degradation: Degradation
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(y, candidates) in model space; the observation is `factor` times smaller than the candidates and of
    their format."""
    if degradation.factor == 1 or not (observed and candidates):
        paths = ([observed] if observed else []) + candidates
        x = load_images(model, paths)[0] if paths else None
        return (degradation.observe(x[:1]), x[1:]) if observed else (None, x)
    y, y_shape, y_format = load_images(model, [observed], degradation.factor)
    x, x_shape, x_format = load_images(model, candidates)
    k = degradation.factor
    if y_format != x_format or tuple(s * k for s in y_shape[-2:]) != tuple(x_shape[-2:]):
        raise CaseError(f"{observed} ({y_format}, {y_shape}) is not the {k}x downsampled observation of "
                        f"{candidates[0]} ({x_format}, {x_shape})")  # fmt: skip
    return y, x


def save_image(model: Any, image: torch.Tensor, name: Path) -> Path:
    """A model-space image as PNG (for a look) and .npy in input units (to rank or use again); the .npy path."""
    save_png(to_uint8(image[None].cpu())[0, 0], name.with_suffix(".png"))
    with atomic_path(name.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, model.spec.preset.inverse(image.cpu().numpy()))
    return name.with_suffix(".npy")


def rank_case(
    model: Any, case: str, observed: Optional[Path], candidates: list[Path], criterion: str, sigma: Optional[float],
    degradation: str, generate: int, steps: int, seed: int, out_dir: Path, samples: int = 0,
    reference: bool = False, prior_weight: float = PRIOR_WEIGHT,
) -> list[dict]:  # fmt: skip
    """Ranking rows (best first) of one case; with `generate`, K candidates made by the CDM are added first;
    with `reference` (criterion `expected-mse`), the posterior mean is written and listed first as rank 0. Rows
    name the criterion `auto` resolved to."""
    try:
        degraded = degradation_for(degradation, model)
    except UsageError as err:
        raise CaseError(str(err)) from None
    y, cands = load_case(model, observed, candidates, degraded)
    names = [str(p) for p in candidates]
    g = torch.Generator(model.device).manual_seed(seed)
    if generate:
        if y is None or sigma is None or degradation != "noise":
            raise CaseError("--generate needs --observed, --sigma and the 'noise' degradation")
        made = [posterior_mean(model.classifier, model.schedule, y, sigma)]
        if generate > 1:
            made.append(posterior_samples(model.classifier, model.schedule, y, sigma, generate - 1, steps=steps,
                                          generator=g))  # fmt: skip
        made = torch.cat(made).clamp(-1, 1)
        names = [str(save_image(model, image, out_dir / f"{case}_generated_{i}")) for i, image in enumerate(made)]
        names += [str(p) for p in candidates]
        cands = made if cands is None or len(cands) == 0 else torch.cat([made, cands])
    if cands is None or len(cands) == 0:
        raise CaseError("no candidates to rank")
    criterion = resolve_criterion(criterion, degraded.operator)
    if reference and criterion != "expected-mse":
        raise CaseError(
            f"--posterior-mean needs the 'expected-mse' criterion, not {criterion!r} "
            "('auto' is expected-mse only for the 'noise' degradation)"
        )
    try:
        ranking = rank_restorations(model.classifier, model.schedule, cands, y, criterion, sigma, degraded.operator,
                                    samples=samples, steps=steps, generator=g, prior_weight=prior_weight)  # fmt: skip
    except ValueError as err:
        raise CaseError(str(err)) from None
    quality = ranking.quality or {}
    rows = []
    if reference:
        mean = ranking.posterior_mean
        path = save_image(model, mean[0].clamp(-1, 1), out_dir / f"{case}_posterior_mean")
        extra = {k: v.item() for k, v in expected_quality(mean, ranking.samples).items()} if quality else {}
        rows.append(dict.fromkeys(COLUMNS, None) | {"case": case, "rank": 0, "candidate": str(path),
                    "criterion": criterion, "score": 0.0, "error": ""} | extra)  # fmt: skip
    for rank, i in enumerate(ranking.order, start=1):
        rows.append({
            "case": case, "rank": rank, "candidate": names[i], "criterion": criterion,
            "prior_weight": prior_weight if criterion in TEMPERED else None, "score": ranking.scores[i].item(),
            "log_prior": None if ranking.log_prior is None else ranking.log_prior[i].item(),
            "log_observation": None if ranking.log_observation is None else ranking.log_observation[i].item(),
            "posterior_weight": None if ranking.weights is None else ranking.weights[i].item(),
            **{k: quality[k][i].item() if k in quality else None for k in QUALITY},
            "error": "",
        })  # fmt: skip
    return rows


def read_manifest(path: Path, degradation: str, sigma: Optional[float]) -> list[tuple]:
    """Cases from a manifest CSV; relative file paths are relative to the manifest's folder."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case", "observed", "candidates"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"--manifest {path}: missing columns {sorted(missing)}")
        cases = []
        for row in reader:

            def resolve(p: str) -> Path:
                return (path.parent / p.strip()) if not Path(p.strip()).is_absolute() else Path(p.strip())

            cases.append((
                row["case"], resolve(row["observed"]) if row["observed"].strip() else None,
                [resolve(p) for p in row["candidates"].split(";") if p.strip()],
                (row.get("degradation") or "").strip() or degradation,
                float(row["sigma"]) if (row.get("sigma") or "").strip() else sigma,
            ))  # fmt: skip
    return cases


def rank_cases(
    model: Any, cases: Iterable[Case], criterion: str, generate: int = 0, steps: int = 50, seed: int = 0,
    out_dir: Optional[Path] = None, strict: bool = False, samples: int = 0, reference: bool = False,
    prior_weight: float = PRIOR_WEIGHT,
) -> tuple[list[dict], int]:  # fmt: skip
    """Ranking rows of every case (best first) and the number of cases that could not be ranked (each gets a row
    with its `error`); with `strict`, the first such case raises `UsageError` instead. Generated candidates and
    posterior means (`reference`) are written into `out_dir`; `prior_weight` as in `rank_restorations`."""
    rows, failed = [], 0
    for case, observed, candidates, degradation, sigma in cases:
        try:
            rows += rank_case(model, case, observed, candidates, criterion, sigma, degradation, generate, steps,
                              seed, out_dir or Path("."), samples, reference, prior_weight)  # fmt: skip
        except CaseError as err:
            if strict:
                raise UsageError(str(err)) from None
            failed += 1
            rows.append(dict.fromkeys(COLUMNS, "") | {"case": case, "criterion": criterion, "error": str(err)})
    return rows, failed
