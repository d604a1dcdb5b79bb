"""Helpers shared by the commands: logging set-up, checkpoint opening, and the options several commands take."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any, Optional

import click

from cdm_ood.utils.precision import PRECISIONS
from cdm_ood.utils.progress import ProgressFactory


class ExitCode(IntEnum):
    """The exit status of every command, stated once (README.md, "Usage"; `tests/test_cli.py` walks every command)."""

    PASSED = 0  # done: every input passed (`score`), every case ranked, every file written
    FOUND = 1  # done, and something is not fine: an input OOD, flagged or unreadable; a case or file that failed
    USAGE = 2  # a user's mistake, stopped before deciding anything: every `cdm_ood.errors.CdmOodError`
    FAILURE = 3  # the command could not finish (interrupted, disk full, a crashed process): nothing was decided


def exit_code(found: bool) -> ExitCode:
    """`FOUND` when a finished command found something not fine, else `PASSED`."""
    return ExitCode.FOUND if found else ExitCode.PASSED


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main process by `stop_on_signals`: the command stops (exit 3)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOPPED: list[int] = []  # the signal that stopped this process, once one has


def stop_on_signals() -> None:
    """Stop on SIGINT (Ctrl-C) and SIGTERM with `Stopped`, also when the signal lands where Python drops the
    exception (a fork handler; it is not printed then): the signal is remembered and `raise_if_stopped`, which every
    progress update calls, raises it again. A forked child (a DataLoader reader) that inherits the handlers reacts
    as it would have without them."""
    main_pid = os.getpid()
    unraisable = sys.unraisablehook
    sys.unraisablehook = lambda info: None if isinstance(info.exc_value, Stopped) else unraisable(info)
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(signum)

        def handler(signum: int, frame: Any, before: Any = before) -> None:
            if os.getpid() != main_pid:
                if callable(before):
                    before(signum, frame)
                    return
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            _STOPPED.append(signum)
            raise Stopped(signum)

        signal.signal(signum, handler)


def raise_if_stopped() -> None:
    """Raise `Stopped` when a signal stopped this process and its exception was dropped."""
    if _STOPPED:
        raise Stopped(_STOPPED[0])


def report_failure(err: BaseException) -> int:
    """Say in one `error:` line on stderr why a command could not finish (with the traceback where
    $CDM_OOD_TRACEBACK is set) and return `ExitCode.FAILURE`."""
    # torch's DataLoader raises from its SIGCHLD handler when a reader process dies: once the command has failed,
    # that would only replace this error line with a traceback
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if os.environ.get("CDM_OOD_TRACEBACK"):
        traceback.print_exception(err)
    click.echo(f"error: {failure_reason(err)}", err=True)
    return ExitCode.FAILURE


def failure_reason(err: BaseException) -> str:
    """One line saying why a command could not finish (`ExitCode.FAILURE`): the signal, the file system's error with
    its path, or the exception's type and first line (library text with quoted values redacted)."""
    from cdm_ood.data.guards import redact

    if _STOPPED and _STOPPED[0] == signal.SIGTERM:
        return "terminated (SIGTERM) before the command finished"
    if _STOPPED or isinstance(err, (KeyboardInterrupt, click.Abort)):
        return "interrupted (Ctrl-C / SIGINT) before the command finished"
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}" + (f": {err.filename}" if err.filename else "")
    return f"{type(err).__name__}: {redact(err)}"


def setup_logging(rank: int = 0) -> None:
    """cdm_ood log lines to stderr; ranks other than 0 of a torchrun job report warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank {rank} %(message)s",
        datefmt="%H:%M:%S",
    )


def resolve_device(device: str) -> str:
    """`cdm_ood.utils.distributed.resolve_device`, imported when an option is parsed (no torch for --help)."""
    from cdm_ood.utils.distributed import resolve_device

    return resolve_device(device)


def open_checkpoint(path: Path, device: str = "cpu") -> Any:
    """The scoring model of a checkpoint; a `CheckpointError` (unsafe, broken, implausible) becomes exit 2."""
    from cdm_ood.model.checkpoint import load_model

    return load_model(path, device)


# Options shared by several commands, declared once.
checkpoint_option = click.option(
    "--checkpoint", required=True, type=click.Path(path_type=Path), help="model.pt of a training run."
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: resolve_device(value),
    help="Where the model runs: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or cuda:N.",
)


def precision_option(default: Optional[str], when_default: str) -> Callable[[Callable], Callable]:
    """`--precision float32|bf16`: the network's backbone in float32 or under bfloat16 autocast (a GPU setting;
    the head, logits and statistics stay float32)."""
    return click.option(
        "--precision", type=click.Choice(PRECISIONS), default=default, show_default=default is not None,
        help=f"Network precision: bf16 runs the backbone under bfloat16 autocast (a GPU setting; scores move with "
             f"it, docs/ood.md){when_default}.",
    )  # fmt: skip


tracking_uri_option = click.option(
    "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here]."
)
mlflow_option = click.option(
    "--mlflow/--no-mlflow", default=True, show_default=True, envvar="CDM_OOD_MLFLOW", show_envvar=True,
    help="Track this run in MLflow (parameters, results, report and figures); a failing tracker is a warning.",
)  # fmt: skip

PROGRESS_EVERY_S = float(os.environ.get("CDM_OOD_PROGRESS_EVERY", "30"))
log = logging.getLogger("cdm_ood.utils.progress")


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """`update(n)` for `n` more of `total` items done: a bar on a terminal; elsewhere (cluster logs, CI) a plain
    log line `label: done/total (pct) rate/s, eta` every $CDM_OOD_PROGRESS_EVERY seconds (30) and at the end."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:

            def advance(n: int) -> None:
                raise_if_stopped()
                bar.update(n)

            yield advance
        return
    start = last = time.monotonic()
    done = shown = 0

    def line() -> None:
        nonlocal shown
        shown = done
        rate = done / max(time.monotonic() - start, 1e-9)
        eta = f", eta {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
        log.info("%s: %d/%d (%.0f%%) %.1f/s%s", label, done, total, 100 * done / max(total, 1), rate, eta)

    def update(n: int) -> None:
        nonlocal done, last
        raise_if_stopped()
        done += n
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            line()

    yield update
    if shown != done or not done:
        line()


def late_progress(stack: ExitStack, detail: str = "") -> ProgressFactory:
    """For jobs that learn their total late (`cdm_ood.utils.progress`): `factory(total, phase)` ends the previous
    phase's progress and opens `progress(total, "<phase> (<detail>)")`, which `stack` ends at the latest."""
    phases = stack.enter_context(ExitStack())

    def factory(total: int, phase: str) -> Callable[[int], None]:
        phases.close()
        return phases.enter_context(progress(total, f"{phase} ({detail})" if detail else phase))

    return factory


def ignore_options(command: Callable) -> Callable:
    """`--exclude GLOB` (repeatable) and `--no-default-ignore`: what a walk through the input folders leaves out;
    the command receives them as `exclude` and `no_default_ignore` (see `ignore_globs`)."""
    command = click.option(
        "--no-default-ignore", is_flag=True,
        help="Also read the files that the default ignore list leaves out (*.csv, *.json, *.txt, README*, "
             "DICOMDIR, ...; see docs/data.md).",
    )(command)  # fmt: skip
    return click.option(
        "--exclude", multiple=True, metavar="GLOB",
        help="Leave out the files found in the input folders whose name or whole path matches GLOB, and with a "
             "trailing / (derived/) every file below a folder of that name (case-insensitive; repeatable; added to "
             "the default ignore list). `score` reports each left-out file as a row `ignored`.",
    )(command)  # fmt: skip


def ignore_globs(exclude: Sequence[str], no_default_ignore: bool) -> tuple[str, ...]:
    """The globs a folder walk leaves out: `--exclude`, plus the default ignore list unless it is turned off."""
    from cdm_ood.data.walk import DEFAULT_IGNORE

    return (*(() if no_default_ignore else DEFAULT_IGNORE), *exclude)
