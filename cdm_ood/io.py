"""Atomic output: every file cdm-ood writes appears whole or not at all."""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for any writer; renamed onto `path` (atomic) when the block succeeds,
    removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` once the block has written everything."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_csv_atomic(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write dict rows with a header line to `path`, atomically, in UTF-8; a file name that is not UTF-8 keeps its
    exact bytes (surrogate escapes), so every name the filesystem allows reaches the file."""
    with atomic_write(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
