"""The model on disk: the model spec and the checkpoint (weights, calibration, training state)."""
