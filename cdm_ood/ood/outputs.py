"""The files one scoring run writes, claimed before any scoring starts.

A run owns its report, the histogram beside it, the folder of partial reports, a lock file, its temporary files
and the previous run's report and histogram, which it moves aside (`<name>.previous.csv`) before it scores, so that
a consumer never reads an old report as the new run's. Claiming them checks that the folder can be written (exit 2
before any work, never a lost report at the end) and takes an exclusive lock, so a second run with the same
`--out` stops at once instead of mixing its rows into the first run's report. Discovery leaves the owned files
out, so a report inside the scanned folder is never scored.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UsageError


class ReportBusyError(UsageError):
    """Another run holds the lock of the same report."""


_HELD: set[int] = set()  # the descriptors of the report locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker reading files), close the inherited lock descriptors: a `flock` lives
    as long as any descriptor of it, so a worker outliving a killed run would hold its report for seconds more."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@dataclass(frozen=True)
class ReportFiles:
    """The outputs of a run that writes `report`."""

    report: Path
    page: Optional[Path] = None  # the run's QA page (`qa_page`), when it writes one

    @property
    def histogram(self) -> Path:
        return self.report.with_name(f"{self.report.stem}_hist.png")

    @property
    def parts(self) -> Path:
        """The folder of partial reports (see `shards`)."""
        return self.report.with_name(f".{self.report.name}.parts")

    @property
    def lock(self) -> Path:
        return self.report.with_name(f".{self.report.name}.lock")

    @staticmethod
    def previous(path: Path) -> Path:
        """Where the previous run's `path` is moved aside: `ood-report.csv` -> `ood-report.previous.csv`."""
        return path.with_name(f"{path.stem}.previous{path.suffix}")

    def move_aside(self) -> list[Path]:
        """Rename the report, histogram and page of an earlier run to their `previous` names (replacing older
        ones); returns the paths they now have."""
        moved = []
        for path in self.outputs:
            try:
                os.replace(path, self.previous(path))
            except FileNotFoundError:
                continue
            except OSError as err:
                raise UsageError(f"--out {self.report}: cannot move the previous run's {path.name} aside "
                                 f"({err.strerror or type(err).__name__}); nothing was scored") from None  # fmt: skip
            moved.append(self.previous(path))
        return moved

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The files a run writes: report, histogram and page."""
        return (self.report, self.histogram, *([] if self.page is None else [self.page]))

    def owns(self, path: Path) -> bool:
        """Whether `path` is one of this run's outputs (report, histogram, page, parts folder, lock, temporary
        files, the previous report, histogram and page)."""
        for output in self.outputs:
            names = (output.name, self.previous(output).name)
            if path.name not in names and not any(path.name.startswith(f".{name}.") for name in names):
                continue  # the cheap test first: this runs for every file discovery walks
            if os.path.realpath(path.parent) == os.path.realpath(output.parent):
                return True
        return False

    @contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold the report for this run: raises `UsageError` if its folder cannot be written, `ReportBusyError`
        if another run holds it. The lock is released (and its file removed) when the block ends."""
        folder = self.report.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{self.report.name}.", suffix=".probe"):
                pass
            fd = self._lock()
        except OSError as err:
            reason = f"cannot write into {folder} ({err.strerror or type(err).__name__})"
            raise UsageError(f"--out {self.report}: {reason}; nothing was scored") from None
        _HELD.add(fd)
        try:
            yield
        finally:
            _HELD.discard(fd)
            self.lock.unlink(missing_ok=True)
            os.close(fd)

    def _lock(self) -> int:
        """An exclusive lock on the lock file; retried when the file was replaced between open and lock."""
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ReportBusyError(
                    f"--out {self.report}: another cdm-ood run is writing this report (lock {self.lock}); wait for it "
                    "to finish or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
