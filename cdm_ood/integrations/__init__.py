"""cdm-ood inside other systems: MLflow tracking and the pyfunc model, the REST server, Spark."""
