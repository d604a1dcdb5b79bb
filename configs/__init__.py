"""The bundled run configurations (installed as `cdm_ood.configs`, so `--config NAME` finds them)."""
