"""Plumbing shared by the layers: atomic files, progress, numeric precision, torchrun state, figures."""
