"""`cdm-ood log-model`: a checkpoint as an MLflow pyfunc model, ready for `mlflow models serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .common import checkpoint_option, device_option, open_checkpoint, setup_logging, tracking_uri_option


@click.command("log-model")
@checkpoint_option
@tracking_uri_option
@click.option("--experiment", default="cdm-ood-models", show_default=True, help="MLflow experiment of the run.")
@click.option("--registered-model-name", metavar="NAME",
              help="Also register the model in the MLflow model registry as a new version of NAME.")  # fmt: skip
@device_option
def log_model_command(
    checkpoint: Path, tracking_uri: Optional[str], experiment: str, registered_model_name: Optional[str], device: str
) -> None:
    """Log the checkpoint (weights, preset, calibrated detector and threshold) as a pyfunc model in a new run
    and print its URI (`models:/NAME/<version>` when registered), e.g. for
    `mlflow models serve -m runs:/<id>/model --env-manager local`."""
    from cdm_ood.ood import NotFittedError
    from cdm_ood.tracking import log_model_run

    setup_logging()
    model = open_checkpoint(checkpoint, device)  # refuses unsafe or broken checkpoints with exit 2
    if model.calibration is None:
        raise NotFittedError(f"{checkpoint} is not calibrated: run `cdm-ood calibrate` first")
    click.echo(log_model_run(model, checkpoint, tracking_uri, experiment, registered_model_name))
