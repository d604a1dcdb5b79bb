"""The CDM as a generative model and as a denoiser, as jobs over files (`cdm-ood sample`, `cdm-ood denoise`):
a grid of samples (`sampling.sample`), and every slice below the inputs through the denoiser (`sampling.denoise`:
the one-step posterior mean of Theorem 3.1, or a sampler from the matching noise level) written as PNG and as
.npy in the input's units. Inputs are only read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import LoadedModel
from .data.errors import DataError, UnreadableFileError
from .data.readers import iter_slices
from .errors import UsageError
from .figures import image_grid, save_png, to_uint8
from .io import atomic_path
from .sampling import denoise, sample


def sample_grid(
    model: LoadedModel,
    n: int,
    out: str | Path,
    method: str = "ddim",
    steps: int = 50,
    label: Optional[int] = None,
    guidance: float = 0.0,
    seed: int = 0,
    npz: Optional[str | Path] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """`n` samples (of class `label`, with classifier-free `guidance`) written as a PNG grid to `out` and, with
    `npz`, as an array in model units; returns them. `callback(i, t, x)` is called after each sampler step."""
    labels = None
    if label is not None:
        if model.classifier.num_classes is None or not 0 <= label < model.classifier.num_classes:
            raise UsageError(f"--label {label}: the model is not conditional on it")
        labels = torch.full((n,), label, dtype=torch.long)
    shape = (n, model.spec.channels, *model.spec.size)
    generator = torch.Generator().manual_seed(seed)
    x = sample(model.classifier, model.schedule, shape, method, steps, labels, guidance, generator,
               null_label=model.classifier.num_classes, callback=callback)  # fmt: skip
    save_png(image_grid(x), Path(out))
    if npz is not None:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, samples=x.numpy())
    return x


def denoise_files(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    sigma: float,
    out: str | Path,
    method: Optional[str] = None,
    steps: int = 50,
    seed: int = 0,
    on_error: Callable[[DataError], None] = lambda err: None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda items: items,
) -> int:
    """Denoise every slice below `inputs` into `out` as `<name>[_t<time>][_<slice>].png` and `.npy`; returns how
    many were written. Unreadable files and slices with NaN/inf or constant pixels go to `on_error` (never
    denoised); `progress` wraps the iteration over the slices (e.g. a progress bar)."""
    out = Path(out)
    if out.resolve() in {Path(p).resolve() for p in inputs}:
        raise UsageError("--out must not be one of the inputs")
    if model.spec.spatial_dims != 2:
        raise UsageError("denoise works on 2D models; this one takes 3D volumes")
    transform = model.spec.input_transform()
    slices = []
    for s in iter_slices(list(inputs), on_error=on_error):
        if s.flags:
            on_error(UnreadableFileError(s.source.path, f"slice {s.source.index} not denoised: {', '.join(s.flags)} "
                                         "pixels"))  # fmt: skip
        else:
            slices.append(s)
    per_file = Counter(s.source.path for s in slices)
    generator = torch.Generator().manual_seed(seed)
    for s in progress(slices):
        x = transform(s.image)[None]
        clean = denoise(model.classifier, x, model.schedule, sigma, method=method, steps=steps, generator=generator)[0]
        name = Path(s.source.path).name.split(".")[0]
        if per_file[s.source.path] > 1:
            name += f"_t{s.source.time_point}" if s.source.time_point is not None else ""
            name += f"_{s.source.index:03d}"
        save_png(to_uint8(clean[None])[0, 0], out / f"{name}.png")
        with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, model.spec.preset.inverse(clean.numpy()))
    return len(slices)
