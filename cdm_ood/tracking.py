"""Training callbacks at the edge: log lines, a metrics file and the resolved config on disk, and MLflow."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from .config import Config, flatten
from .io import atomic_write

log = logging.getLogger("cdm_ood.tracking")

# MLflow defaults that suit a training job: no telemetry, and an unreachable server is given up on in seconds
# rather than minutes. Values the user has set in the environment win.
MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def apply_mlflow_env() -> None:
    """Set the `MLFLOW_ENV` defaults in this process, leaving values the user has set alone."""
    for key, value in MLFLOW_ENV.items():
        os.environ.setdefault(key, value)


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


class MlflowCallback:
    """Tracks the run in MLflow: params (flattened config), the YAML config, metrics per step, the final
    checkpoint, and a pyfunc model loadable by run id. If the tracking store fails, warns once and lets training
    go on (checkpoints stay in the run folder)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: Optional[str]) -> None:
        apply_mlflow_env()
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: Optional[str] = None
        self.failed = False

    def _safe(self, action: str, fn, *args, **kwargs) -> Any:
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store or network failure must not stop training
            self.failed = True
            log.warning(
                "MLflow tracking at %s failed while %s (%s: %s); training goes on without it, checkpoints are kept "
                "in the run folder", self.uri, action, type(err).__name__, str(err).splitlines()[0][:200],
            )  # fmt: skip
            return None

    def on_start(self, config: Config, info: dict[str, Any]) -> None:
        self._safe("starting the run", self._start, config, info)

    def _start(self, config: Config, info: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=self.run_name or config.name)
        self.run_id = run.info.run_id
        params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(config).items()}
        mlflow.log_params({**params, **{f"run.{k}": v for k, v in info.items() if not isinstance(v, list)}})
        mlflow.log_text(config.to_yaml(), "config.yaml")
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        import mlflow

        self._safe("logging metrics", mlflow.log_metrics, metrics, step=step)

    on_validation = on_step

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Checkpoints are logged once, at the end (each can be large)."""

    def on_end(self, model_path: Path) -> None:
        self._safe("logging the model", self._end, model_path)

    def _end(self, model_path: Path) -> None:
        import mlflow

        from .checkpoint import load_checkpoint
        from .serving import log_pyfunc_model

        mlflow.log_artifact(str(model_path), "checkpoints")
        if "calibration" in load_checkpoint(model_path):
            log_pyfunc_model(model_path)
            log.info("MLflow model: runs:/%s/model", self.run_id)
        else:
            log.warning("no MLflow model logged: the checkpoint has no OOD calibration (`cdm-ood calibrate`, then "
                        "`cdm-ood log-model`)")  # fmt: skip
        mlflow.end_run()


def log_artifact_to_run(run_id: str, path: Path, uri: Optional[str] = None, folder: Optional[str] = None) -> None:
    """Add a file to an existing MLflow run (e.g. a sample grid made after training)."""
    apply_mlflow_env()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri or default_tracking_uri()).log_artifact(run_id, str(path), folder)


def log_job_run(
    kind: str, params: dict[str, Any], metrics: dict[str, Any], files: list[Path], uri: Optional[str] = None
) -> Optional[str]:
    """One MLflow run (experiment `cdm-ood-<kind>`) for a scoring or evaluation job: its parameters, numeric
    results and files (report, figures). Returns the run id, or None when the tracking store failed: that is a
    warning, never the job's result (the gate's exit code and its files on disk stand)."""
    try:
        mlflow = _mlflow(uri, f"cdm-ood-{kind}")
        with mlflow.start_run() as run:
            mlflow.log_params(params)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
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


def log_model_run(checkpoint: Path, uri: Optional[str] = None, experiment: str = "cdm-ood-models") -> str:
    """A new MLflow run holding the checkpoint's pyfunc model; returns the model URI `runs:/<id>/model`."""
    from .serving import log_pyfunc_model

    mlflow = _mlflow(uri, experiment)
    with mlflow.start_run() as run:
        mlflow.log_param("checkpoint", str(checkpoint))
        log_pyfunc_model(checkpoint)
    return f"runs:/{run.info.run_id}/model"
