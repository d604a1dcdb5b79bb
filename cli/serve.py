"""`cdm-ood log-model`: a checkpoint as an MLflow pyfunc model; `cdm-ood serve`: that model over REST, with request
limits (`cdm_ood.integrations.rest`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import click

from cdm_ood.integrations.rest import DEFAULT_MAX_REQUEST_MB, MAX_REQUEST_MB

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
    and print its URI (`models:/NAME/<version>` when registered), e.g. for `cdm-ood serve runs:/<id>/model` or
    `mlflow models serve -m runs:/<id>/model --env-manager local`."""
    from cdm_ood.integrations.tracking import log_model_run
    from cdm_ood.ood import NotFittedError

    setup_logging()
    model = open_checkpoint(checkpoint, device)  # refuses unsafe or broken checkpoints with exit 2
    if model.calibration is None:
        raise NotFittedError(f"{checkpoint} is not calibrated: run `cdm-ood calibrate` first")
    click.echo(log_model_run(model, checkpoint, tracking_uri, experiment, registered_model_name))


def _megabytes(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"expected a positive number of megabytes, got {value}")
    return value


@click.command("serve")
@click.argument("model_uri", metavar="MODEL_URI")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes, each with its own copy of the model.")  # fmt: skip
@click.option("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB, show_default=True, callback=_megabytes,
              envvar=MAX_REQUEST_MB, show_envvar=True,
              help="Largest request body, in MB (10^6 bytes); a larger one is answered 413 unread.")  # fmt: skip
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), default=60, show_default=True,
              envvar="MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", show_envvar=True,
              help="Seconds a request may take (as in `mlflow models serve`): then it is answered 504 and its "
                   "scoring stops.")  # fmt: skip
@click.option("--shutdown-timeout", "shutdown_s", type=click.IntRange(min=0), default=5, show_default=True,
              help="On SIGTERM, seconds that running requests get to finish before they are abandoned.")  # fmt: skip
@tracking_uri_option
def serve_command(
    model_uri: str,
    host: str,
    port: int,
    workers: int,
    max_request_mb: float,
    timeout_s: int,
    shutdown_s: int,
    tracking_uri: Optional[str],
) -> None:
    """Serve MODEL_URI (a model of `cdm-ood log-model`: models:/NAME/VERSION, runs:/ID/model or its folder) over
    REST with MLflow's scoring server (/ping, /invocations, the request formats of `mlflow models serve`), adding
    a request size limit (413), scoring that stops when its request is given up (client gone, --timeout passed,
    server stopping) and a prompt exit on SIGTERM (docs/scaling.md)."""
    import mlflow

    from cdm_ood.integrations.rest import serve
    from cdm_ood.integrations.tracking import apply_mlflow_env, default_tracking_uri

    setup_logging()
    apply_mlflow_env()
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    serve(model_uri, host, port, workers, max_request_mb, timeout_s, shutdown_s)
