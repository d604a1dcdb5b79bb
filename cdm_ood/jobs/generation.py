"""The CDM as a generative model and as a denoiser, as jobs over files (`cdm-ood sample`, `cdm-ood denoise`):
a grid of samples (`sampling.sample`), and every slice below the inputs through the denoiser (`sampling.denoise`:
the one-step posterior mean of Theorem 3.1, or a sampler from the matching noise level) written back in the
input's format, geometry and units. Inputs are only read."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from monai.transforms import Resize
from pydicom.uid import generate_uid

from ..data.errors import DataError, UnreadableFileError
from ..data.readers import iter_slices
from ..data.records import Slice, describe_flags
from ..data.writers import IMAGE_SUFFIXES, output_suffix, write_like
from ..diffusion.sampling import denoise, sample
from ..errors import UsageError
from ..model.checkpoint import LoadedModel
from ..utils.figures import image_grid, save_png
from ..utils.io import atomic_path
from ..utils.progress import ProgressFactory, counted


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
    generator = torch.Generator(model.device).manual_seed(seed)
    labels = None if labels is None else labels.to(model.device)
    x = sample(model.classifier, model.schedule, shape, method, steps, labels, guidance, generator,
               null_label=model.classifier.num_classes, device=model.device, callback=callback).cpu()  # fmt: skip
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
    progress: Optional[ProgressFactory] = None,
) -> int:
    """Denoise every slice below `inputs` and write each file again under `out` in its own format and geometry
    (`data.writers.write_like`: DICOM with a new SeriesInstanceUID per series, NIfTI with the input's affine, PNG
    at the input's size), at the path it has below its input folder; names that would collide get `-2`, `-3`.
    Returns how many slices were denoised. Unreadable files, files that cannot be written back (colour DICOM) and
    slices with NaN/inf or constant pixels go to `on_error` (never denoised; a volume keeps such slices as they
    were); `progress(total, "denoising")` returns the function to call after each slice (e.g. a progress bar's
    update)."""
    if model.spec.spatial_dims != 2:
        raise UsageError("denoise works on 2D models; this one takes 3D volumes")
    out = Path(out)
    files = _denoise_targets(inputs, out, on_error)
    transform = model.spec.input_transform()
    generator = torch.Generator(model.device).manual_seed(seed)
    todo = [(s, path) for path, (_, good) in files.items() for s in good]
    done: dict[str, dict] = defaultdict(dict)
    for s, path in counted(todo, progress(len(todo), "denoising") if progress else None):
        x = transform(s.image)[None].to(model.device)
        clean = denoise(model.classifier, x, model.schedule, sigma, method=method, steps=steps, generator=generator)[0]
        clean = clean.cpu()
        back = clean if tuple(clean.shape[1:]) == s.image.shape[1:] else Resize(s.image.shape[1:])(clean)
        done[path][(s.source.time_point, s.source.index if s.source.frame is None else s.source.frame)] = (
            model.spec.preset.inverse(np.asarray(back))
        )
    series = defaultdict(generate_uid)
    for path, (target, good) in files.items():
        if good:
            try:
                write_like(path, done[path], target, series[good[0].source.volume_id])
            except DataError as err:
                on_error(err)
    return len(todo)


def _denoise_targets(
    inputs: Sequence[str | Path], out: Path, on_error: Callable[[DataError], None]
) -> dict[str, tuple[Path, list[Slice]]]:
    """Each input file -> (its output path, its slices that may be denoised); flagged slices go to `on_error`.
    No output path is an input file or another output."""
    if out.resolve() in {Path(p).resolve() for p in inputs}:
        raise UsageError("--out-dir must not be one of the inputs")
    found = [(root, s) for root in map(Path, inputs) for s in iter_slices(root, on_error=on_error)]
    taken = {Path(s.source.path).resolve() for _, s in found}
    files: dict[str, tuple[Path, list[Slice]]] = {}
    for root, s in found:
        if s.source.path not in files:
            relative = Path(s.source.path).relative_to(root) if root.is_dir() else Path(root.name)
            target = _free_name(out / relative, output_suffix(s.source.path), taken)
            taken.add(target.resolve())
            files[s.source.path] = (target, [])
        if s.flags:
            on_error(UnreadableFileError(s.source.path, f"slice {s.source.index} not denoised: "
                                         f"{describe_flags(s.flags)}"))  # fmt: skip
        else:
            files[s.source.path][1].append(s)
    return files


def _free_name(path: Path, suffix: str, taken: set[Path]) -> Path:
    """`path` with its image suffix replaced by `suffix`, and `-2`, `-3`... before it when that path is taken."""
    stem = path.name
    known = next((k for k in IMAGE_SUFFIXES if stem.lower().endswith(k)), "")
    stem = stem[: len(stem) - len(known)]
    candidate, n = path.with_name(stem + suffix), 1
    while candidate.resolve() in taken:
        n += 1
        candidate = path.with_name(f"{stem}-{n}{suffix}")
    return candidate
