"""`cdm-ood sample` and `cdm-ood denoise`: the CDM as a generative model and as an MMSE denoiser."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import click

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
    from cdm_ood.generation import sample_grid

    setup_logging()
    model = open_checkpoint(checkpoint)
    with click.progressbar(length=steps, label=f"{method}, {steps} steps", file=sys.stderr) as bar:
        sample_grid(model, n, out, method, steps, label, guidance, seed, npz, callback=lambda i, t, x: bar.update(1))
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
    from cdm_ood.generation import denoise_files

    setup_logging()
    model = open_checkpoint(checkpoint)
    errors = []

    def bar(slices):
        return click.progressbar(slices, label="denoising", file=sys.stderr)

    with ExitStack() as stack:
        written = denoise_files(model, inputs, sigma, out, None if method == "mmse" else method, steps, seed,
                                errors.append, lambda slices: stack.enter_context(bar(slices)))  # fmt: skip
    for err in errors:
        click.echo(f"skipped {err.path}: {err.reason}", err=True)
    click.echo(f"denoised {written} slices into {out}")
    sys.exit(1 if errors else 0)
