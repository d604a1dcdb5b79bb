"""Files sent as bytes (a Spark binary column, a served request) staged as paths the readers open, and the report's
rows mapped back to the names they were sent under."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit


class StagedFiles:
    """Files as paths the readers open: local paths as they are; binary content written below `root` at its own
    path (URI scheme dropped), so names, suffixes and folders stay, and mapped back in rows."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: dict[str, str] = {}

    def add(self, path: str, content: Optional[bytes]) -> Path:
        if content is None:
            return Path(path)
        uri = urlsplit(path)
        local = self.root / posixpath.normpath(f"/{uri.netloc}/{uri.path}").lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)
        self.names[str(local)] = path
        self.names.setdefault(str(local.parent), path.rpartition("/")[0])
        return local

    def restore(self, row: dict) -> dict:
        """A report row with the names the files were sent under in place of the staged paths."""
        if not self.names:
            return row
        reason = row["reason"] and row["reason"].replace(str(self.root), "")
        return row | {k: self.names.get(row[k], row[k]) for k in ("path", "volume")} | {"reason": reason}
