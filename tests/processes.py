"""`cdm-ood` and the benchmark scripts as real processes, optionally without root's power to ignore file permissions.

A fresh interpreter spends seconds importing torch, MONAI and MLflow before it runs a command, and the suite starts
dozens of them. `cdm` and `warm_run` therefore fork each process from a server that has imported those libraries
once (`WARM`, multiprocessing's forkserver): still a process of its own, with its own working directory,
environment, exit status and output, run as `python -m cdm_ood.cli` or `python script.py` would run it, only
without the import time. The project's own CLI modules are not imported ahead (one reads the environment when it
is imported). A command that needs a fresh interpreter (`fresh=True`: what the interpreter itself prints; a
`prefix` such as setpriv or torchrun; PYTHONPATH in `env`; other `subprocess.run` options) gets one.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

# Root reads and writes through any permission bits; without these two capabilities it cannot (util-linux's
# setpriv drops them for the command it runs), so a mode-000 folder is unreadable to the process, as for a user.
WITHOUT_ROOT_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()
WARM = ("torch", "monai", "mlflow", "nibabel", "pydicom", "sklearn.metrics", "cdm_ood.ood.api", "cdm_ood.jobs.training")
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(list(WARM))


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives a process (a message is printed to stderr and gives 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _child(target: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked process: `python -m target` (a module) or `python target` (a script) with `argv`, in `cwd` with
    exactly `env`, stdout and stderr to the files `out` and `err`; exits with the command's status after the exit
    handlers a real interpreter runs."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [target, *argv]
    script = target.endswith(".py")
    sys.path.insert(0, str(Path(target).parent) if script else cwd)
    status = 0
    try:
        if script:
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def warm_run(target: str, args: Sequence[Any], cwd: Path, env: dict[str, str], timeout: Optional[float] = None):
    """`target` (a module run with -m, or a script path) run as a process forked from the `WARM` server."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        process = SERVER.Process(target=_child, args=(target, argv, str(cwd), env, str(out), str(err)))
        process.start()
        process.join(timeout)
        command = [sys.executable, *(["-m"] if not target.endswith(".py") else []), target, *argv]
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout or 0, _text(out), _text(err))
        return subprocess.CompletedProcess(command, process.exitcode, _text(out), _text(err))


def _text(path: Path) -> str:
    """What the child wrote to `path` (nothing when it died before opening it)."""
    return path.read_text() if path.exists() else ""


def clean_env(env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment without MLflow settings (an earlier test's `mlflow.set_tracking_uri` leaves
    MLFLOW_TRACKING_URI here), plus `env`. Under `make mutants` a child runs the mutant under test, but not mutmut's
    call recording (`MUTANT_UNDER_TEST=stats`): what a child records never reaches the run, and mutmut looks for its
    settings in the child's working folder."""
    stats = os.environ.get("MUTANT_UNDER_TEST") == "stats"
    dropped = ("MLFLOW_", "MUTANT_UNDER_TEST") if stats else ("MLFLOW_",)
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)} | (env or {})


def cdm(*args: Any, cwd: Path, prefix: Sequence[str] = (), env: dict[str, str] | None = None, fresh: bool = False,
        **kwargs: Any) -> subprocess.CompletedProcess:  # fmt: skip
    """`cdm-ood ...` as a real process (its own working directory, no MLflow settings inherited unless given in
    `env`): forked from the `WARM` server, or a fresh interpreter where the module docstring says so."""
    full = clean_env(env)
    if fresh or prefix or "PYTHONPATH" in (env or {}) or set(kwargs) - {"timeout"}:
        return subprocess.run([*prefix, sys.executable, "-m", "cdm_ood.cli", *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, env=full, **kwargs)  # fmt: skip
    return warm_run("cdm_ood.cli", args, cwd, full, kwargs.get("timeout"))


def without_modules(folder: Path, *modules: str) -> dict[str, str]:
    """An environment for `cdm(..., env=...)` in which importing any of `modules` fails as if it were not
    installed: PYTHONPATH puts, ahead of site-packages, a package of each name that raises ImportError."""
    for name in modules:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {"PYTHONPATH": str(folder)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_tool(name: str, package: str = "dcmtk") -> str:
    """The path of a system program a test runs (dcmtk, dicom3tools, Orthanc); the test is skipped, naming the Debian
    package, where it is not installed."""
    import pytest

    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; `make test` installs it with apt where the "
                    "system allows)")  # fmt: skip
    return found
