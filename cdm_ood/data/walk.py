"""The files below the given paths, in a deterministic order, less the non-image files that always sit beside
scans (`DEFAULT_IGNORE`: manifests, sidecars, DICOMDIR, READMEs, desktop litter, the defect masks of
`make-phantoms --defects`) and the user's own globs (`cdm-ood score --exclude GLOB`). Files named one by one are
never ignored: only what a folder walk finds. Nothing is left out silently: every ignored file is passed to
`on_ignored` with the pattern that matched it, and the gate reports it as a row."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Optional

from .errors import DataError, EmptyFolderError, UnreadableFileError, report_error

log = logging.getLogger("cdm_ood.data")

# Matched, case-insensitively, against a file's name and its whole path (see `ignore_match`); none names a folder.
DEFAULT_IGNORE: tuple[str, ...] = (
    "*.csv", "*.tsv", "*.json", "*.txt", "*.md", "*.rst", "*.pdf", "*.html", "*.htm", "*.xml", "*.log",
    "*.yaml", "*.yml", "*.ini", "*.bval", "*.bvec", "README*", "LICENSE*", "CHANGES", "DICOMDIR",
    ".DS_Store", "._*", "Thumbs.db", "desktop.ini", "*/masks/*_mask.nii.gz",
)  # fmt: skip


@dataclass(frozen=True)
class IgnoredFile:
    """A file that a folder walk left out, and the glob that left it out."""

    path: str
    pattern: str

    @property
    def reason(self) -> str:
        return f"not read: matches the ignore pattern {self.pattern!r}"


def ignore_match(path: Path, globs: Sequence[str], folders: Sequence[str] = ()) -> Optional[str]:
    """The first glob that leaves the file `path` out, or None. A glob matches the file's name or its whole path
    (so `*/derived/*` leaves out every file below every folder named `derived`); a glob ending in `/` matches
    folders only: the names in `folders` (those between the walked root and the file). Case-insensitive; `*`
    also matches `/`."""
    name, whole = path.name.lower(), path.as_posix().lower()
    for glob in globs:
        pattern = glob.lower()
        if pattern.endswith("/"):
            if any(fnmatchcase(folder.lower(), pattern.rstrip("/")) for folder in folders):
                return glob
        elif fnmatchcase(name, pattern) or fnmatchcase(whole, pattern):
            return glob
    return None


def walk_files(
    paths: Sequence[str | os.PathLike],
    on_error: Optional[Callable[[DataError], None]],
    exclude: Optional[Callable[[Path], bool]],
    ignore: Sequence[str] = DEFAULT_IGNORE,
    on_ignored: Optional[Callable[[IgnoredFile], None]] = None,
) -> Iterator[Path]:
    """Files below `paths` in a deterministic order, less those `exclude`d (the caller's own files: never
    reported) or matched by an `ignore` glob (`ignore_match`; each passed to `on_ignored`). Given files are always
    kept. Symlinked folders are followed, each real folder once (no loops); a folder that cannot be listed, and a
    given folder that holds no file to read, are reported, not skipped."""
    seen: set[tuple[int, int]] = set()

    def first_visit(folder: Path) -> bool:
        try:
            st = os.stat(folder)
        except OSError:
            return True  # os.walk reports it through `unlisted`
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    def unlisted(err: OSError) -> None:
        reason = f"cannot list folder: {err.strerror or type(err).__name__}; its files were not scored"
        report_error(UnreadableFileError(err.filename, reason), on_error)

    for root in paths:
        root = Path(root)
        if not root.is_dir():
            yield root
            continue
        found, by_name = False, []
        for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
            if not first_visit(Path(folder)):
                dirs.clear()
                continue
            dirs[:] = sorted(d for d in dirs if exclude is None or not exclude(Path(folder) / d))
            between = Path(folder).relative_to(root).parts
            for name in sorted(files):
                path = Path(folder) / name
                if exclude is not None and exclude(path):
                    continue
                pattern = ignore_match(path, ignore, between)
                if pattern is None:
                    found = True
                    yield path
                    continue
                by_name.append(name)
                if on_ignored is not None:
                    on_ignored(IgnoredFile(str(path), pattern))
        if by_name:
            log.info("%s: %d files ignored by name (%s)", root, len(by_name), ", ".join(sorted(set(by_name))[:5]))
        if not found and os.access(root, os.R_OK | os.X_OK):
            only = f" (only {len(by_name)} files ignored by name, e.g. {by_name[0]})" if by_name else ""
            report_error(EmptyFolderError(root, f"the folder holds no files{only}: nothing to score"), on_error)
