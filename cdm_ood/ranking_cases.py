"""Ranking restoration cases as a job: read each case's observation and candidate files, rank the candidates
(`ranking.rank_restorations`, the math), optionally add candidates made by the CDM denoiser, and return the
ranking rows. `cdm-ood rank-restorations` and `benchmarks/ranking.py` call it."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .data import read_file
from .data.discovery import detect_format
from .data.errors import DataError
from .errors import UsageError
from .figures import save_png, to_uint8
from .io import atomic_path
from .ranking import rank_restorations
from .sampling import denoise

Case = tuple[str, Optional[Path], list[Path], str, Optional[float]]  # name, observed, candidates, degradation, sigma

COLUMNS = ("case", "rank", "candidate", "criterion", "score", "log_prior", "log_observation", "error")


class CaseError(Exception):
    """A case that cannot be ranked (unreadable file, shape or preset mismatch), with the files named."""


def operator_for(spec: str, device: str | torch.device = "cpu"):
    """`noise` (the identity) or `blur:<px>` (Gaussian blur with that std in pixels, MONAI's GaussianFilter, on
    `device`)."""
    if spec == "noise":
        return None
    kind, _, value = spec.partition(":")
    if kind == "blur":
        from monai.networks.layers import GaussianFilter

        try:
            return GaussianFilter(spatial_dims=2, sigma=float(value)).to(device)
        except ValueError:
            pass
    raise UsageError(f"--degradation {spec!r}: expected 'noise' or 'blur:<std in pixels>'")


def load_images(model: Any, paths: list[Path]):
    """The model-space images of single-slice files, which must share raw shape and format (hence preset)."""

    transform = model.spec.input_transform()
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
            raise CaseError(f"{path}: {', '.join(slices[0].flags)} pixels")
        shapes[path] = slices[0].image.shape
        images.append(transform(slices[0].image))
    for label, values in (("shape", shapes), ("format (and so intensity preset)", formats)):
        if len(set(values.values())) > 1:
            first = paths[0]
            other = next(p for p in paths if values[p] != values[first])
            raise CaseError(f"{label} mismatch: {first} is {values[first]} but {other} is {values[other]}")
    return torch.stack(images).to(model.device)


def rank_case(
    model: Any, case: str, observed: Optional[Path], candidates: list[Path], criterion: str, sigma: Optional[float],
    degradation: str, generate: int, steps: int, seed: int, out_dir: Path,
) -> list[dict]:  # fmt: skip
    """Ranking rows (best first) of one case; with `generate`, K candidates made by the CDM are added first."""
    paths = ([observed] if observed else []) + candidates
    x = load_images(model, paths) if paths else None
    y = x[:1] if observed else None
    cands, names = (x[1:] if observed else x), [str(p) for p in candidates]
    if generate:
        if y is None or sigma is None or degradation != "noise":
            raise CaseError("--generate needs --observed, --sigma and the 'noise' degradation")
        g = torch.Generator(model.device).manual_seed(seed)
        made = [denoise(model.classifier, y, model.schedule, sigma)]
        made += [denoise(model.classifier, y, model.schedule, sigma, method="ddpm", steps=steps, generator=g)
                 for _ in range(generate - 1)]  # fmt: skip
        made = torch.cat(made).clamp(-1, 1)
        for i, image in enumerate(made.cpu()):
            name = out_dir / f"{case}_generated_{i}"
            save_png(to_uint8(image[None])[0, 0], name.with_suffix(".png"))
            with atomic_path(name.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, model.spec.preset.inverse(image.numpy()))
        names = [str(out_dir / f"{case}_generated_{i}.npy") for i in range(len(made))] + names
        cands = made if cands is None or len(cands) == 0 else torch.cat([made, cands])
    if cands is None or len(cands) == 0:
        raise CaseError("no candidates to rank")
    try:
        ranking = rank_restorations(model.classifier, model.schedule, cands, y, criterion, sigma,
                                    operator_for(degradation, model.device))  # fmt: skip
    except ValueError as err:
        raise CaseError(str(err)) from None
    rows = []
    for rank, i in enumerate(ranking.order, start=1):
        rows.append({
            "case": case, "rank": rank, "candidate": names[i], "criterion": criterion,
            "score": ranking.scores[i].item(),
            "log_prior": None if ranking.log_prior is None else ranking.log_prior[i].item(),
            "log_observation": None if ranking.log_observation is None else ranking.log_observation[i].item(),
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
    out_dir: Optional[Path] = None, strict: bool = False,
) -> tuple[list[dict], int]:  # fmt: skip
    """Ranking rows of every case (best first) and the number of cases that could not be ranked (each gets a row
    with its `error`); with `strict`, the first such case raises `UsageError` instead. Generated candidates are
    written into `out_dir`."""
    rows, failed = [], 0
    for case, observed, candidates, degradation, sigma in cases:
        try:
            rows += rank_case(model, case, observed, candidates, criterion, sigma, degradation, generate, steps,
                              seed, out_dir or Path("."))  # fmt: skip
        except CaseError as err:
            if strict:
                raise UsageError(str(err)) from None
            failed += 1
            rows.append(dict.fromkeys(COLUMNS, "") | {"case": case, "criterion": criterion, "error": str(err)})
    return rows, failed
