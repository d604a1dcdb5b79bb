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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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


class Spool:
    """The node's folders (see the module); `store` is safe to call from several receiving threads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for stage in STAGES:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
        self.partial = self.root / "incoming" / ".partial"
        self.partial.mkdir(exist_ok=True)
        self.log_path = self.root / "decisions.jsonl"
        self._lock = threading.Lock()
        self._arrivals: dict[SeriesKey, float] = {}
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
        """After a start: empty `.partial/`, and have every series in `incoming/` wait a new quiet period; returns
        what was found (series waiting, batches in work, batches to forward)."""
        for leftover in self.partial.iterdir():
            leftover.unlink()
        now = time.monotonic()
        for study in (self.root / "incoming").iterdir():
            if study == self.partial or not study.is_dir():
                continue
            for series in study.iterdir():
                if any(series.glob("*.dcm")):
                    self._arrivals[SeriesKey(study.name, series.name)] = now
        return {"waiting": len(self._arrivals), "work": len(self.batches("work")),
                "outbox": len(self.batches("outbox"))}  # fmt: skip

    def store(self, encoded: bytes, key: SeriesKey, sop_instance_uid: str) -> Path:
        """Write one instance (its file bytes, with preamble and file meta) durably into `incoming/`: a partial file,
        fsync, rename, fsync of the folder. Returns its path; only then may its C-STORE be acknowledged."""
        folder = self.root / "incoming" / key.study / key.series
        tmp = self.partial / f"{sop_instance_uid}.{threading.get_ident()}.{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        with self._lock:
            new = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{sop_instance_uid}.dcm"
            os.replace(tmp, path)
            self._arrivals[key] = time.monotonic()
        fsync_folder(folder)
        if new:
            fsync_folder(folder.parent)
            fsync_folder(folder.parent.parent)
        return path

    def quiet(self, seconds: float, by_study: bool = False) -> list[SeriesKey]:
        """The series whose last instance arrived more than `seconds` ago (with `by_study`: whose study's last
        instance did)."""
        now = time.monotonic()
        with self._lock:
            last: dict[str, float] = {}
            for key, t in self._arrivals.items():
                last[key.study] = max(last.get(key.study, t), t)
            return [key for key, t in self._arrivals.items()
                    if now - (last[key.study] if by_study else t) > seconds]  # fmt: skip

    def claim(self, key: SeriesKey) -> Path:
        """Move a quiet series' instances from `incoming/` into a new batch in `work/` (one rename); an instance
        that arrives from now on starts a new series folder. Returns the batch folder."""
        with self._lock:
            self._arrivals.pop(key, None)
            source = self.root / "incoming" / key.study / key.series
            n = 1 + sum(1 for stage in STAGES[1:] for _ in (self.root / stage).glob(f"{key.series}.*"))
            batch = self.root / "work" / f"{key.series}.{n}"
            batch.mkdir()
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
