"""The jobs that run a model, and their configuration: training (and the calibration at its end), sampling
and denoising files, ranking restoration cases."""
