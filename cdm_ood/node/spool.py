"""The node's spool: every received instance is on disk before its C-STORE is acknowledged, and every series moves
through folders that say how far it got, so a node killed at any moment resumes without losing an acknowledged
instance or deciding a series twice.

    <spool>/incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received (fsync, then rename)
    <spool>/incoming/.partial/                                                      writes not yet complete
    <spool>/work/<batch>/instances/                                                 claimed for gating
    <spool>/work/<batch>/report.csv, results/                                       its report and DICOM results
    <spool>/outbox/<batch>/                                                         decided: to forward
    <spool>/quarantine/<batch>/                                                     decided: held for a person
    <spool>/sent/<batch>/                                                           forwarded
    <spool>/decisions.jsonl                                                         one line per decision or event

A batch is the instances of one series (`<SeriesInstanceUID>.<n>`, n counting the batches of that series) that
had arrived when the series went quiet; an instance that arrives later starts another batch. A batch's decision
is appended to `decisions.jsonl` (fsync) before its folder moves out of `work/`: on restart, a batch in `work/`
with a decision is moved on, one without is gated again (its scoring never finished), `.partial/` (never
acknowledged) is emptied, and every series in `incoming/` waits for a new quiet period.

Instances are received by several processes at once (`receive.Receivers`): when a series went quiet is read from its
folder's modification time (a rename into it sets it), and `incoming/.lock` (flock: shared to store, exclusive to
claim) keeps an instance from landing in a series folder while that folder moves to `work/`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STAGES = ("incoming", "work", "outbox", "quarantine", "sent")


def fsync_folder(folder: Path) -> None:
    """Make the entries of `folder` durable (a file renamed into it): fsync the folder itself (POSIX)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_uid(uid: Optional[str], what: str) -> str:
    """A UID fit for a folder name: digits and dots (DICOM's UID syntax), at most 64 characters."""
    uid = (uid or "").strip().rstrip("\x00")
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"{what} is not a valid UID")
    return uid


@dataclass(frozen=True)
class SeriesKey:
    """Where a received instance belongs: its study and series."""

    study: str
    series: str


class Incoming:
    """`incoming/`: the received instances by study and series folder, written safely by any number of threads and
    processes (a receiver process makes its own `Incoming` of the same folder)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.partial = self.folder / ".partial"
        self.partial.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.folder / ".lock"
        self.lock_path.touch()

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold `.lock`: shared while an instance is renamed into a series folder, exclusive while one moves."""
        with open(self.lock_path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def store(self, encoded: bytes, key: SeriesKey, sop_instance_uid: str) -> Path:
        """Write one instance (its file bytes, with preamble and file meta) durably into its series folder: a partial
        file, fsync, rename, fsync of the folder (by a handle taken before the rename, so it counts even if the folder
        has moved to `work/` since). Returns its path; only then may its C-STORE be acknowledged."""
        folder = self.folder / key.study / key.series
        tmp = self.partial / f"{sop_instance_uid}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        with self.locked(exclusive=False):
            new = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            handle = os.open(folder, os.O_RDONLY)
            path = folder / f"{sop_instance_uid}.dcm"
            os.replace(tmp, path)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        if new:
            fsync_folder(folder.parent)
            fsync_folder(folder.parent.parent)
        return path

    def series(self) -> dict[SeriesKey, float]:
        """Each series folder that holds an instance, and when one last arrived in it (its modification time)."""
        found = {}
        for study in os.scandir(self.folder):
            if study.name.startswith(".") or not study.is_dir():
                continue
            for series in os.scandir(study.path):
                with os.scandir(series.path) as entries:
                    if any(entry.name.endswith(".dcm") for entry in entries):
                        found[SeriesKey(study.name, series.name)] = series.stat().st_mtime
        return found


class Spool:
    """The node's folders (see the module)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for stage in STAGES:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
        self.incoming = Incoming(self.root / "incoming")
        self.partial = self.incoming.partial
        self.log_path = self.root / "decisions.jsonl"
        self._lock = threading.Lock()
        self._started = 0.0  # `recover` sets it: no series is quiet before the node has been up a quiet period
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # told of each line `record` writes
        self._end_torn_line()
        # The decisions of `decisions.jsonl`, read once here and kept up to date by `record` (the node asks every step)
        self._decided = {e["batch"]: e for e in self.entries() if e.get("event") == "decided"}

    def _end_torn_line(self) -> None:
        """End a line that a kill cut short (no newline at the end of the log), so the next line stands alone."""
        if self.log_path.exists() and self.log_path.stat().st_size:
            with open(self.log_path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())

    def recover(self) -> dict[str, Any]:
        """After a start: empty `.partial/`, and have every series in `incoming/` wait a new quiet period (counted
        from now); returns what was found (series waiting, batches in work, batches to forward)."""
        for leftover in self.partial.iterdir():
            leftover.unlink()
        self._started = time.time()
        return {"waiting": len(self.incoming.series()), "work": len(self.batches("work")),
                "outbox": len(self.batches("outbox"))}  # fmt: skip

    def store(self, encoded: bytes, key: SeriesKey, sop_instance_uid: str) -> Path:
        """`Incoming.store`: one instance, durably, before its C-STORE is acknowledged."""
        return self.incoming.store(encoded, key, sop_instance_uid)

    def quiet(self, seconds: float, by_study: bool = False) -> list[SeriesKey]:
        """The series whose last instance arrived more than `seconds` ago (with `by_study`: whose study's last
        instance did), and not before the node has been up that long (`recover`)."""
        now = time.time()
        arrivals = {key: max(t, self._started) for key, t in self.incoming.series().items()}
        last: dict[str, float] = {}
        for key, t in arrivals.items():
            last[key.study] = max(last.get(key.study, t), t)
        return [key for key, t in arrivals.items() if now - (last[key.study] if by_study else t) > seconds]

    def claim(self, key: SeriesKey) -> Path:
        """Move a quiet series' instances from `incoming/` into a new batch in `work/` (one rename, under the exclusive
        lock); an instance that arrives from now on starts a new series folder. Returns the batch folder."""
        source = self.incoming.folder / key.study / key.series
        n = 1 + sum(1 for stage in STAGES[1:] for _ in (self.root / stage).glob(f"{key.series}.*"))
        batch = self.root / "work" / f"{key.series}.{n}"
        batch.mkdir()
        with self.incoming.locked(exclusive=True):
            os.replace(source, batch / "instances")
        (batch / "study").write_text(key.study)
        fsync_folder(batch)
        fsync_folder(batch.parent)
        fsync_folder(source.parent)
        return batch

    def batches(self, stage: str) -> list[Path]:
        """The batch folders of a stage (`work`, `outbox`, `quarantine`, `sent`), oldest first."""
        return sorted((p for p in (self.root / stage).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)

    def move(self, batch: Path, stage: str) -> Path:
        """Move a batch folder into `stage`."""
        target = self.root / stage / batch.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(batch, target)
        fsync_folder(target.parent)
        fsync_folder(batch.parent)
        return target

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append one line to `decisions.jsonl` (with its time), durably, then tell the `listeners`."""
        stamped = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
        with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(stamped) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if stamped.get("event") == "decided":
                self._decided[stamped["batch"]] = stamped
        for listener in self.listeners:
            listener(stamped)

    def decisions(self) -> dict[str, dict[str, Any]]:
        """The decision recorded for each batch (`event` "decided"), by batch name."""
        return dict(self._decided)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every line of `decisions.jsonl` (a torn last line, from a kill mid-write, is skipped)."""
        if not self.log_path.exists():
            return
        with open(self.log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
