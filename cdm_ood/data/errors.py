"""Typed errors for input files: every file is either read or given one of these, naming file and reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from ..errors import CdmOodError


class DataError(CdmOodError):
    """Base class: a file that cannot be turned into image slices. `path` and `reason` are kept separately."""

    kind = "unreadable"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Rebuilt from path and reason: DataLoader workers send these errors to the scoring process."""
        return type(self), (self.path, self.reason)


class UnreadableFileError(DataError):
    """The file is of a known format but broken: truncated, missing pixel data, malformed header."""

    kind = "unreadable"


class EmptyFolderError(UnreadableFileError):
    """A folder given as input holds no file: nothing to score, which a gate must not take for a pass."""


class UnsupportedFormatError(DataError):
    """The file is an image in a format (or compression) that cdm-ood cannot decode here."""

    kind = "unsupported"


class NotAnImageError(DataError):
    """The file holds no image: a text file, a DICOM structured report, an RT plan, a tractogram."""

    kind = "not-an-image"


class TooLargeError(DataError):
    """The file declares more voxels than the budget (`--max-voxels`): refused from its header, never decoded."""

    kind = "too-large"


def report_error(err: DataError, on_error: Optional[Callable[[DataError], None]]) -> None:
    """Pass `err` to `on_error` without its traceback (a caught error's frames would keep what the reader held,
    for every failed file of an archive until the report is written), or raise it when there is none."""
    if on_error is None:
        raise err
    on_error(err.with_traceback(None))
