"""The files below the given paths, in a deterministic order, less the non-image files that always sit beside
scans (`DEFAULT_IGNORE`: manifests, sidecars, DICOMDIR, READMEs, desktop litter, the defect masks of
`make-phantoms --defects`) and the user's own globs (`cdm-ood score --exclude GLOB`). Files named one by one are
never ignored: only what a folder walk finds."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Optional

from .errors import DataError, EmptyFolderError, UnreadableFileError, report_error

log = logging.getLogger("cdm_ood.data")

# Matched, case-insensitively, against a file's or folder's name (and its whole path, see `ignored`).
DEFAULT_IGNORE: tuple[str, ...] = (
    "*.csv", "*.tsv", "*.json", "*.txt", "*.md", "*.rst", "*.pdf", "*.html", "*.htm", "*.xml", "*.log",
    "*.yaml", "*.yml", "*.ini", "*.bval", "*.bvec", "README*", "LICENSE*", "CHANGES", "DICOMDIR",
    ".DS_Store", "._*", "Thumbs.db", "desktop.ini", "*/masks/*_mask.nii.gz",
)  # fmt: skip


def ignored(path: Path, globs: Sequence[str]) -> bool:
    """True when a glob matches the name of `path` or the whole path (so `*/derived/*` leaves out everything
    below every folder named `derived`); case-insensitive, `*` also matches `/`."""
    name, whole = path.name.lower(), path.as_posix().lower()
    return any(fnmatchcase(name, g) or fnmatchcase(whole, g) for g in (glob.lower() for glob in globs))


def walk_files(
    paths: Sequence[str | os.PathLike],
    on_error: Optional[Callable[[DataError], None]],
    exclude: Optional[Callable[[Path], bool]],
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> Iterator[Path]:
    """Files below `paths` in a deterministic order, less those `exclude`d or matched by an `ignore` glob (given
    files are always kept). Symlinked folders are followed, each real folder once (no loops); a folder that
    cannot be listed, and a given folder that holds no file to read, are reported, not skipped."""
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

    def left_out(path: Path) -> bool:
        return ignored(path, ignore) or (exclude is not None and exclude(path))

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
            dirs[:] = sorted(d for d in dirs if not left_out(Path(folder) / d))
            for name in sorted(files):
                path = Path(folder) / name
                if ignored(path, ignore):
                    by_name.append(name)
                elif exclude is None or not exclude(path):
                    found = True
                    yield path
        if by_name:
            log.info("%s: %d files ignored by name (%s)", root, len(by_name), ", ".join(sorted(set(by_name))[:5]))
        if not found and os.access(root, os.R_OK | os.X_OK):
            only = f" (only {len(by_name)} files ignored by name, e.g. {by_name[0]})" if by_name else ""
            report_error(EmptyFolderError(root, f"the folder holds no files{only}: nothing to score"), on_error)
