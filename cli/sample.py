"""`cdm-ood sample` and `cdm-ood denoise`: the CDM as a generative model and as an MMSE denoiser."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import click

from cdm_ood.errors import UsageError

from .common import checkpoint_option, open_checkpoint, setup_logging, tracking_uri_option


@click.command("sample")
@checkpoint_option
@click.option("--n", default=64, show_default=True, help="Number of samples.")
@click.option("--method", default="ddim", show_default=True, help="A sampler of `cdm_ood.sampling.METHODS`.")
@click.option("--steps", default=50, show_default=True, help="Network evaluations (noise levels visited).")
@click.option("--label", type=int, help="Class to sample (class-conditional models).")
@click.option("--guidance", default=0.0, show_default=True, help="Classifier-free guidance weight w.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Sample grid PNG.")
@click.option("--npz", type=click.Path(path_type=Path), help="Also write the samples (model space, [-1, 1]).")
@click.option("--mlflow-run", help="Log the grid to this MLflow run id.")
@tracking_uri_option
def sample_command(
    checkpoint: Path, n: int, method: str, steps: int, label: Optional[int], guidance: float, seed: int, out: Path,
    npz: Optional[Path], mlflow_run: Optional[str], tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """Draw samples from a trained model and write them as a PNG grid."""
    import numpy as np
    import torch

    from cdm_ood.figures import image_grid, save_png
    from cdm_ood.io import atomic_path
    from cdm_ood.sampling import sample

    setup_logging()
    model = open_checkpoint(checkpoint)
    labels = None
    if label is not None:
        if model.classifier.num_classes is None or not 0 <= label < model.classifier.num_classes:
            raise UsageError(f"--label {label}: the model is not conditional on it")
        labels = torch.full((n,), label, dtype=torch.long)
    shape = (n, model.spec.channels, *model.spec.size)
    with click.progressbar(length=steps, label=f"{method}, {steps} steps", file=sys.stderr) as bar:
        x = sample(model.classifier, model.schedule, shape, method, steps, labels, guidance,
                 torch.Generator().manual_seed(seed), null_label=model.classifier.num_classes,
                 callback=lambda i, t, x: bar.update(1))  # fmt: skip
    save_png(image_grid(x), out)
    if npz is not None:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, samples=x.numpy())
    if mlflow_run is not None:
        from cdm_ood.tracking import log_artifact_to_run

        log_artifact_to_run(mlflow_run, out, tracking_uri, "samples")
    click.echo(f"samples: {out}")


@click.command("denoise")
@checkpoint_option
@click.option("--sigma", required=True, type=float, help="Noise std of the inputs, in model units ([-1, 1] scale).")
@click.option(
    "--method",
    default="mmse",
    show_default=True,
    help="mmse: the one-step posterior mean; a sampler of `cdm_ood.sampling.METHODS`: the reverse process from the "
    "matching noise level.",
)
@click.option("--steps", default=50, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the denoised images.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def denoise_command(checkpoint: Path, sigma: float, method: str, steps: int, seed: int, out: Path, inputs) -> None:
    """Denoise images (DICOM, NIfTI, PNG): writes <name>[_<slice>].png and .npy (input units) into OUT.

    Inputs are read-only; the outputs are at the model's size.
    """
    import numpy as np
    import torch

    from cdm_ood.data import iter_slices
    from cdm_ood.figures import save_png, to_uint8
    from cdm_ood.io import atomic_path
    from cdm_ood.sampling import denoise

    setup_logging()
    model = open_checkpoint(checkpoint)
    if out.resolve() in {p.resolve() for p in inputs}:
        raise UsageError("--out must not be one of the inputs")
    if model.spec.spatial_dims != 2:
        raise UsageError("denoise works on 2D models; this one takes 3D volumes")
    transform = model.spec.input_transform()
    errors = []
    slices = list(iter_slices(list(inputs), on_error=errors.append))
    per_file = Counter(s.source.path for s in slices)
    generator = torch.Generator().manual_seed(seed)
    with click.progressbar(slices, label="denoising", file=sys.stderr) as bar:
        for s in bar:
            x = transform(s.image)[None]
            clean = denoise(model.classifier, x, model.schedule, sigma, method=None if method == "mmse" else method,
                         steps=steps, generator=generator)[0]  # fmt: skip
            name = Path(s.source.path).name.split(".")[0]
            if per_file[s.source.path] > 1:
                name += f"_t{s.source.time_point}" if s.source.time_point is not None else ""
                name += f"_{s.source.index:03d}"
            save_png(to_uint8(clean[None])[0, 0], out / f"{name}.png")
            with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, model.spec.preset.inverse(clean.numpy()))
    for err in errors:
        click.echo(f"skipped {err.path}: {err.reason}", err=True)
    click.echo(f"denoised {len(slices)} slices into {out}")
    sys.exit(1 if errors else 0)
