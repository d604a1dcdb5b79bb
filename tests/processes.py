"""`cdm-ood` as a real process, optionally without root's power to ignore file permissions."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Root reads and writes through any permission bits; without these two capabilities it cannot (util-linux's
# setpriv drops them for the command it runs), so a mode-000 folder is unreadable to the process, as for a user.
WITHOUT_ROOT_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()


def cdm(*args: Any, cwd: Path, prefix: Sequence[str] = (), env: dict[str, str] | None = None, **kwargs: Any):
    """`cdm-ood ...` as a real process (fresh interpreter, its own working directory, no MLflow settings
    inherited unless given in `env`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([*prefix, sys.executable, "-m", "cdm_ood.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=base | (env or {}), **kwargs)  # fmt: skip


def without_modules(folder: Path, *modules: str) -> dict[str, str]:
    """An environment for `cdm(..., env=...)` in which importing any of `modules` fails as if it were not
    installed: PYTHONPATH puts, ahead of site-packages, a package of each name that raises ImportError."""
    for name in modules:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {"PYTHONPATH": str(folder)}
