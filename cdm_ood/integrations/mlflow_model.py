"""MLflow "models from code" entry point: defines the pyfunc model that `mlflow.pyfunc.log_model` records."""

import mlflow

from cdm_ood.integrations.serving import CDMPyfuncModel

mlflow.models.set_model(CDMPyfuncModel())
