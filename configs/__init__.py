"""The bundled run configurations (installed as `cdm_ood.configs`, so `--config NAME` finds them)."""

from importlib.resources import files


def bundled_names() -> list[str]:
    """The names of the bundled configs (`<name>.yaml` beside this file)."""
    return sorted(p.name[: -len(".yaml")] for p in files(__name__).iterdir() if p.name.endswith(".yaml"))
