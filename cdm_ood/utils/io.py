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


# Text that a spreadsheet takes for a formula when a cell starts with it (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _formula_like(text: str) -> bool:
    """A formula start after any number of `'` (text that already looks escaped is escaped again)."""
    return text.lstrip("'").startswith(FORMULA_STARTS)


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with `'` (OWASP's advice), so that it shows
    as text; numbers and other text stay as they are (`spreadsheet_value` undoes it, also for text that begins
    with `'` and a formula start)."""
    return f"'{value}" if isinstance(value, str) and _formula_like(value) else value


def spreadsheet_value(cell: str) -> str:
    """The text that `spreadsheet_safe` wrote as `cell`."""
    return cell[1:] if cell.startswith("'") and _formula_like(cell[1:]) else cell


def write_csv_atomic(
    path: str | os.PathLike, columns: Sequence[str], rows: Sequence[dict[str, Any]], for_people: bool = False
) -> None:
    """Write dict rows with a header line to `path`, atomically, in UTF-8; a file name that is not UTF-8 keeps its
    exact bytes (surrogate escapes), so every name the filesystem allows reaches the file. A CSV `for_people`
    (reports opened in spreadsheets) has its text cells made `spreadsheet_safe`."""
    with atomic_write(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{k: spreadsheet_safe(v) for k, v in row.items()} for row in rows] if for_people else rows)
