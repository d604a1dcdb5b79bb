"""Watched folders as a source of the node, for sites that receive by file share (`cdm-ood listen --watch`): every
DICOM file below a watched folder, once its size and modification time held still from one poll to the next (a file
still being copied grows), is copied into the spool (`Spool.store`) and gated with its series, as if it had arrived
by C-STORE. The folders are only read: nothing in them is moved, renamed or deleted.

Each file taken is a `taken` line of `decisions.jsonl` (path, size, modification time), each file that is not a DICOM
instance with valid UIDs a `refused` line with the reason: a restart takes no file twice, and a file rewritten since
(another size or time) is taken again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .receive import series_of
from .spool import Spool

log = logging.getLogger("cdm_ood.node")

Stamp = tuple[int, int]  # (size, modification time in ns)


class FolderSource:
    """The files below `folders` (see the module); `poll` takes those that held still since the last poll."""

    def __init__(self, folders: Sequence[str | Path], spool: Spool) -> None:
        self.folders, self.spool = [Path(f) for f in folders], spool
        self.name = ", ".join(str(f) for f in self.folders)
        self._last: dict[str, Stamp] = {}
        self._done = {(e["path"], e["size"], e["mtime_ns"]) for e in spool.entries()
                      if e.get("event") in ("taken", "refused")}  # fmt: skip

    def _stamps(self) -> dict[str, Stamp]:
        found = {}
        for folder in self.folders:
            for path in folder.rglob("*"):
                if path.name.startswith(".") or not path.is_file():
                    continue
                st = path.stat()
                found[str(path)] = (st.st_size, st.st_mtime_ns)
        return found

    def poll(self) -> int:
        """Copy every file that is new (or rewritten) and held still since the last poll into the spool; returns
        how many were taken."""
        stamps, taken = self._stamps(), 0
        for path, (size, mtime) in stamps.items():
            if (path, size, mtime) in self._done or self._last.get(path) != (size, mtime):
                continue
            entry = {"path": path, "size": size, "mtime_ns": mtime}
            try:
                data = Path(path).read_bytes()
                key, sop = series_of(data)
            except Exception as err:  # not DICOM, no valid UIDs, unreadable: said once, never gated
                self.spool.record({"event": "refused", **entry, "reason": f"not a DICOM instance with valid UIDs "
                                   f"({type(err).__name__})"})  # fmt: skip
            else:
                self.spool.store(data, key, sop)
                self.spool.record({"event": "taken", **entry, "series_instance_uid": key.series})
                taken += 1
            self._done.add((path, size, mtime))
        self._last = stamps
        return taken
