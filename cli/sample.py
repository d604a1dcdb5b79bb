"""`cdm-ood sample` and `cdm-ood denoise`: the CDM as a generative model and as an MMSE denoiser."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import click

from .common import (
    checkpoint_option,
    device_option,
    exit_code,
    late_progress,
    open_checkpoint,
    progress,
    setup_logging,
    tracking_uri_option,
)


@click.command("sample")
@checkpoint_option
@click.option("--n", default=64, show_default=True, help="Number of samples.")
@click.option("--method", default="ddim", show_default=True, help="A sampler of `cdm_ood.diffusion.sampling.METHODS`.")
@click.option("--steps", default=50, show_default=True, help="Network evaluations (noise levels visited).")
@click.option("--label", type=int, help="Class to sample (class-conditional models).")
@click.option("--guidance", default=0.0, show_default=True, help="Classifier-free guidance weight w.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler's noise.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Sample grid PNG.")
@click.option("--npz", type=click.Path(path_type=Path), help="Also write the samples (model space, [-1, 1]).")
@click.option("--mlflow-run", help="Log the grid to this MLflow run id.")
@tracking_uri_option
@device_option
def sample_command(
    checkpoint: Path, n: int, method: str, steps: int, label: Optional[int], guidance: float, seed: int, out: Path,
    npz: Optional[Path], mlflow_run: Optional[str], tracking_uri: Optional[str], device: str,
) -> None:  # fmt: skip
    """Draw samples from a trained model and write them as a PNG grid."""
    from cdm_ood.jobs.generation import sample_grid

    setup_logging()
    model = open_checkpoint(checkpoint, device)
    with progress(steps, f"{method}, {steps} steps") as update:
        sample_grid(model, n, out, method, steps, label, guidance, seed, npz, callback=lambda i, t, x: update(1))
    if mlflow_run is not None:
        from cdm_ood.integrations.tracking import log_artifact_to_run

        log_artifact_to_run(mlflow_run, out, tracking_uri, "samples")
    click.echo(f"samples: {out}")


@click.command("denoise")
@checkpoint_option
@click.option("--sigma", required=True, type=float, help="Noise std of the inputs, in model units ([-1, 1] scale).")
@click.option(
    "--method",
    default="mmse",
    show_default=True,
    help="mmse: the one-step posterior mean; a sampler of `cdm_ood.diffusion.sampling.METHODS`: the reverse process "
    "from the matching noise level.",
)
@click.option("--steps", default=50, show_default=True, help="Sampler steps (methods other than mmse).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler's noise.")
@click.option("--out-dir", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the denoised files (created; inputs are never overwritten).")  # fmt: skip
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@device_option
def denoise_command(
    checkpoint: Path, sigma: float, method: str, steps: int, seed: int, out: Path, inputs, device: str
) -> None:
    """Denoise images INPUTS (DICOM, NIfTI, PNG files or folders) into OUT_DIR, each in its own format and geometry.

    A DICOM file keeps its tags under a new SeriesInstanceUID (one per input series) and SOPInstanceUID, a NIfTI
    volume keeps its affine, a PNG its size; each output sits at its input's path below the input folder (`-2`,
    `-3` added where two would share a name). Inputs are only read.
    """
    from cdm_ood.jobs.generation import denoise_files

    setup_logging()
    model = open_checkpoint(checkpoint, device)
    errors = []
    with ExitStack() as bars:
        written = denoise_files(model, inputs, sigma, out, None if method == "mmse" else method, steps, seed,
                                errors.append, late_progress(bars))  # fmt: skip
    for err in errors:
        click.echo(f"skipped {err.path}: {err.reason}", err=True)
    click.echo(f"denoised {written} slices into {out}")
    sys.exit(exit_code(bool(errors)))
