"""Training callbacks at the edge: log lines, a metrics file and the resolved config on disk, and MLflow."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..jobs.config import Config, flatten
from ..utils.io import atomic_write

if TYPE_CHECKING:
    from ..model.checkpoint import LoadedModel
    from ..model.spec import Calibration

log = logging.getLogger("cdm_ood.integrations.tracking")

# MLflow defaults that suit a training job: no telemetry, an unreachable server given up on in seconds rather than
# minutes, MLflow's own INFO lines (database set-up, experiment creation, input-example validation) left out of the
# job's log (its warnings and errors stay), and no GitPython warning where no git executable is installed (the run
# then records no commit). Values the user has set in the environment win.
MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
}
TRAINING_RUN_TAG = "cdm_ood.training_run_id"  # on score, evaluate and model runs: the run that trained the model


def apply_mlflow_env() -> None:
    """Set the `MLFLOW_ENV` defaults in this process, leaving values the user has set alone, and the levels of
    MLflow's loggers (MLflow sets them when it is first imported, which MONAI may have done already)."""
    for key, value in MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # database migrations, one INFO line each


def _mlflow(uri: Optional[str], experiment: str) -> Any:
    """The mlflow module, pointed at `uri` (default store when None) and `experiment`."""
    apply_mlflow_env()
    import mlflow

    mlflow.set_tracking_uri(uri or default_tracking_uri())
    mlflow.set_experiment(experiment)
    return mlflow


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class RunFolderCallback:
    """Writes `config.yaml` (resolved) and `metrics.jsonl` into the run folder and logs progress lines."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.steps = 0

    def on_start(self, config: Config, info: dict[str, Any]) -> None:
        self.steps = config.train.steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.out_dir / "config.yaml") as f:
            f.write(config.to_yaml())
        log.info(
            "training %s: %s parameters on %s, global batch %d (%d per process x %d), %d train / %d val samples",
            config.name, f"{info['parameters']:,}", info["device"], info["global_batch"],
            config.train.batch_size, info["world_size"], info["n_train"], info["n_val"],
        )  # fmt: skip

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"step": step, **metrics})
        log.info(
            "step %d/%d  loss %.4f  mse %.4f  ce %.3f  acc %.3f  lr %.2e  %.2f steps/s",
            step, self.steps, metrics["loss"], metrics["mse"], metrics["ce"], metrics["accuracy"],
            metrics["lr"], metrics["steps_per_s"],
        )  # fmt: skip

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"step": step, **metrics})
        log.info(
            "step %d validation: %.4f bits/dim, %.4f nats/dim", step, metrics["val_bpd"], metrics["val_nats_per_dim"]
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        log.info("checkpoint %s", path)

    def on_end(self, model_path: Path) -> None:
        log.info("model checkpoint: %s", model_path)

    def on_abort(self, error: BaseException) -> None:
        how = "failed" if isinstance(error, Exception) else "was stopped"
        log.warning("training %s; `cdm-ood train --resume %s` continues from its last checkpoint", how, self.out_dir)

    def checkpoint_entries(self) -> dict[str, Any]:
        """Nothing: the run folder is where the checkpoints are."""
        return {}


class MlflowCallback:
    """Tracks the run in MLflow: params (flattened config), the YAML config, metrics per step, the final
    checkpoint, and a pyfunc model loadable by run id. The run ends FINISHED, FAILED (an exception stopped
    training) or KILLED (Ctrl-C, SIGTERM). Its id is stored in every checkpoint; `run_id` (from the checkpoint of
    a resumed training) continues that run. If the tracking store fails, warns once and lets training go on
    (checkpoints stay in the run folder)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: Optional[str], run_id: Optional[str] = None):
        apply_mlflow_env()
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.started = False
        self.failed = False

    def _warn(self, action: str, err: Exception) -> None:
        if not self.failed:
            log.warning(
                "MLflow tracking at %s failed while %s (%s: %s); training goes on without it, checkpoints are kept "
                "in the run folder", self.uri, action, type(err).__name__, str(err).splitlines()[0][:200],
            )  # fmt: skip
        self.failed = True

    def _safe(self, action: str, fn, *args, **kwargs) -> Any:
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store or network failure must not stop training
            self._warn(action, err)
            return None

    def on_start(self, config: Config, info: dict[str, Any]) -> None:
        self._safe("starting the run", self._start, config, info)

    def _start(self, config: Config, info: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        previous = self._run_to_continue()
        if previous is None:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name or config.name)
        else:  # in its own experiment, whatever the resumed config names
            mlflow.set_experiment(experiment_id=previous.info.experiment_id)
            run = mlflow.start_run(run_id=previous.info.run_id)
        self.run_id, self.started = run.info.run_id, True
        config_params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(config).items()}
        params = {**config_params, **{f"run.{k}": v for k, v in info.items() if not isinstance(v, list)}}
        if previous is None:
            mlflow.log_params(params)
            log.info("MLflow run %s in %s", self.run_id, self.uri)
        else:  # params cannot change in MLflow: new keys are added, changed values are in config.yaml
            logged = previous.data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            changed = sorted(k for k, v in config_params.items() if k in logged and logged[k] != str(v))
            mlflow.set_tag("cdm_ood.resumed_at_step", info["start_step"])
            log.info("MLflow run %s in %s continued at step %d%s", self.run_id, self.uri, info["start_step"],
                     f" (changed: {', '.join(changed)}; see its config.yaml)" if changed else "")  # fmt: skip
        mlflow.log_text(config.to_yaml(), "config.yaml")

    def _run_to_continue(self) -> Any:
        """The MLflow run of `run_id`, or None when a new run is to start: none given, or the run is not in this
        store or was deleted (then a warning)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.run_id is None:
            return None
        try:
            run = MlflowClient(self.uri).get_run(self.run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
        log.warning("MLflow run %s of the resumed checkpoint is not in %s (or was deleted); the training continues "
                    "in a new run", self.run_id, self.uri)  # fmt: skip
        self.run_id = None
        return None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        import mlflow

        self._safe("logging metrics", mlflow.log_metrics, metrics, step=step)

    on_validation = on_step

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Checkpoints are logged once, at the end (each can be large)."""

    def checkpoint_entries(self) -> dict[str, Any]:
        """The run id, so that `cdm-ood train --resume` continues this run and score/evaluate runs link to it."""
        from ..model.checkpoint import RUN_ID

        return {RUN_ID: self.run_id} if self.run_id else {}

    def on_end(self, model_path: Path) -> None:
        self._safe("logging the model", self._end, model_path)
        self._close("FINISHED")

    def on_abort(self, error: BaseException) -> None:
        """End the run FAILED (an exception) or KILLED (KeyboardInterrupt, SystemExit: Ctrl-C, SIGTERM)."""
        self._close("FAILED" if isinstance(error, Exception) else "KILLED")

    def _close(self, status: str) -> None:
        """End the run with `status`, also after a tracking failure (a run left RUNNING would look alive)."""
        import mlflow

        if not self.started:
            return
        try:
            mlflow.end_run(status)
        except Exception as err:  # the store is gone: the warning says so, training's own outcome stands
            self._warn("ending the run", err)
        self.started = False

    def _end(self, model_path: Path) -> None:
        import mlflow

        from ..model.checkpoint import load_checkpoint
        from .serving import log_pyfunc_model

        mlflow.log_artifact(str(model_path), "checkpoints")
        if "calibration" in load_checkpoint(model_path):
            log_pyfunc_model(model_path)
            log.info("MLflow model: runs:/%s/model", self.run_id)
        else:
            log.warning("no MLflow model logged: the checkpoint has no OOD calibration (`cdm-ood calibrate`, then "
                        "`cdm-ood log-model`)")  # fmt: skip


def log_artifact_to_run(run_id: str, path: Path, uri: Optional[str] = None, folder: Optional[str] = None) -> None:
    """Add a file to an existing MLflow run (e.g. a sample grid made after training)."""
    apply_mlflow_env()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri or default_tracking_uri()).log_artifact(run_id, str(path), folder)


def calibration_metrics(calibration: Optional[Calibration]) -> dict[str, float]:
    """The calibrated false-positive rate and each detector's threshold at it (`calibration.<detector>.threshold`,
    the threshold `auto` means); empty for an uncalibrated model."""
    from ..ood.calibration import threshold_at_fpr

    if calibration is None:
        return {}
    thresholds = {f"calibration.{name}.threshold": threshold_at_fpr(np.asarray(fit.id_scores), calibration.fpr)
                  for name, fit in calibration.detectors.items()}  # fmt: skip
    return {"calibration.fpr": calibration.fpr, **thresholds}


def log_job_run(
    kind: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    files: list[Path],
    uri: Optional[str] = None,
    model: Optional[LoadedModel] = None,
) -> Optional[str]:
    """One MLflow run (experiment `cdm-ood-<kind>`) for a scoring or evaluation job: its parameters, numeric
    results and files (report, figures); with the `model` it used, the tag `cdm_ood.training_run_id` (the run that
    trained it, when tracked) and its calibrated thresholds (`calibration_metrics`). Returns the run id, or None
    when the tracking store failed: that is a warning, never the job's result (the gate's exit code and its files
    on disk stand)."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if model is not None:
        numbers |= calibration_metrics(model.calibration)
    try:
        mlflow = _mlflow(uri, f"cdm-ood-{kind}")
        with mlflow.start_run(tags=lineage_tags(model)) as run:
            mlflow.log_params(params)
            mlflow.log_metrics(numbers)
            for path in files:
                mlflow.log_artifact(str(path))
    except Exception as err:  # any store or network failure: warn, keep the job's own outcome
        log.warning(
            "MLflow tracking at %s failed (%s: %s); the %s run was not logged, its results are on disk",
            uri or default_tracking_uri(), type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", kind,
        )  # fmt: skip
        return None
    log.info("MLflow %s run %s in %s", kind, run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


class NodeRun:
    """The MLflow run of a `cdm-ood listen` node (experiment `cdm-ood-listen`): its parameters when it starts, then,
    at each line of its `decisions.jsonl` (a `Spool` listener), its running counts as metrics with the number of
    lines so far as their step: `series_forward`, `series_hold`, `instances_gated`, `forwarded`, `forward_failed`,
    `fetched`, `returned`, `return_failed`. A failing store is a warning, then the node goes on untracked."""

    def __init__(self, params: dict[str, Any], uri: Optional[str] = None, model: Optional[LoadedModel] = None):
        self.counts: dict[str, float] = dict.fromkeys(("series_forward", "series_hold", "instances_gated",
                                                       "forwarded", "forward_failed", "fetched", "returned",
                                                       "return_failed"), 0.0)  # fmt: skip
        self.step, self.run_id, self._client = 0, None, None
        try:
            mlflow = _mlflow(uri, "cdm-ood-listen")
            client = mlflow.MlflowClient()
            experiment = mlflow.get_experiment_by_name("cdm-ood-listen").experiment_id
            self.run_id = client.create_run(experiment, tags=lineage_tags(model)).info.run_id
            self._client = client
            for key, value in params.items():
                client.log_param(self.run_id, key, value)
            for key, value in (calibration_metrics(model.calibration) if model is not None else {}).items():
                client.log_metric(self.run_id, key, value)
        except Exception as err:  # any store failure: the node runs untracked
            log.warning("MLflow tracking at %s failed (%s); the node runs untracked", uri or default_tracking_uri(),
                        type(err).__name__)  # fmt: skip
            self._client = None
            return
        log.info("MLflow listen run %s in %s", self.run_id, mlflow.get_tracking_uri())

    def __call__(self, entry: dict[str, Any]) -> None:
        """Count one line of `decisions.jsonl` and log the counts."""
        event = entry.get("event")
        if event == "decided":
            self.counts[f"series_{entry['decision']}"] += 1
            self.counts["instances_gated"] += entry.get("instances", 0)
        elif event is not None and event.replace("-", "_") in self.counts:
            self.counts[event.replace("-", "_")] += 1
        self.step += 1
        if self._client is None:
            return
        from mlflow.entities import Metric

        try:
            timestamp = int(time.time() * 1000)
            metrics = [Metric(k, v, timestamp, self.step) for k, v in self.counts.items()]
            self._client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # the store went away: untracked from now on
            log.warning("MLflow tracking failed (%s); the node goes on untracked", type(err).__name__)
            self._client = None

    def close(self, decisions: Optional[Path] = None) -> None:
        """End the run, with the node's `decisions.jsonl` as an artifact."""
        if self._client is None:
            return
        try:
            if decisions is not None and decisions.is_file():
                self._client.log_artifact(self.run_id, str(decisions))
            self._client.set_terminated(self.run_id)
        except Exception as err:
            log.warning("MLflow tracking failed (%s) when the node stopped", type(err).__name__)


def lineage_tags(model: Optional[LoadedModel]) -> dict[str, str]:
    """`cdm_ood.training_run_id`: the training run of the model, when it was tracked. (Not MLflow's parent-run
    tag: that nests runs of one job in one experiment, and a scoring run is not a step of its training.)"""
    run_id = model.training_run_id if model is not None else None
    return {TRAINING_RUN_TAG: run_id} if run_id else {}


def log_model_run(
    model: LoadedModel,
    checkpoint: Path,
    uri: Optional[str] = None,
    experiment: str = "cdm-ood-models",
    registered_model_name: Optional[str] = None,
) -> str:
    """A new MLflow run holding the pyfunc model of `checkpoint` (whose loaded `model` it is, for its lineage tag);
    with `registered_model_name`, also a new version of that model in the registry. Returns the URI to serve:
    `models:/<name>/<version>` when registered, else `runs:/<id>/model`."""
    from .serving import log_pyfunc_model

    mlflow = _mlflow(uri, experiment)
    with mlflow.start_run(tags=lineage_tags(model)) as run:
        mlflow.log_param("checkpoint", str(checkpoint))
        info = log_pyfunc_model(checkpoint, registered_model_name=registered_model_name)
    log.info("MLflow model: runs:/%s/model in %s", run.info.run_id, mlflow.get_tracking_uri())
    if registered_model_name is None:
        return f"runs:/{run.info.run_id}/model"
    return f"models:/{registered_model_name}/{info.registered_model_version}"
