"""What the readers check before they decode anything, and how they keep library output out of sight.

A file is opened only if it is a regular file; its declared size (DICOM Rows x Columns x frames x samples, the
NIfTI header's shape, the PNG/JPEG header's size) must fit a voxel budget; a deflated DICOM dataset may inflate
to at most `BYTES_PER_VOXEL` bytes per voxel of that budget. So a small file that inflates to gigabytes is
refused from its header, never decoded. The readers' libraries log and warn on broken files; those messages are
kept from the terminal (the file's reason carries the exception), and reason strings never copy header text.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import stat
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DataError, NotAnImageError, TooLargeError, UnreadableFileError

MAX_VOXELS = 2**27  # 134,217,728 voxels (512 x 512 x 512) per file: the default of `--max-voxels`
BYTES_PER_VOXEL = 4  # 32-bit samples (FloatPixelData): the byte budget of a deflated DICOM dataset per voxel
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is one zlib stream
# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2); the others have a 2-byte length.
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
LIBRARY_LOGGERS = ("pydicom", "nibabel", "PIL", "monai")
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))  # fmt: skip
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def require_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and sockets (also behind a symlink): opening one can block forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UnreadableFileError(path, f"cannot open file: {err.strerror or type(err).__name__}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise NotAnImageError(path, f"{kind}, not a regular file: never opened")


def require_budget(path: Path, shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse a file whose declared shape holds more than `max_voxels` voxels, before it is decoded."""
    voxels = math.prod(shape)
    if voxels > max_voxels:
        dims = "x".join(str(s) for s in shape)
        raise TooLargeError(path, f"declares {voxels:,} voxels ({dims}), above the budget of {max_voxels:,} "
                            "(--max-voxels): refused without decoding")  # fmt: skip


def require_deflated_budget(path: Path, max_voxels: int) -> None:
    """A deflated DICOM dataset is inflated whole by pydicom: stream-inflate it first, refusing it once it grows
    past `max_voxels * BYTES_PER_VOXEL` bytes (memory stays at one chunk)."""
    from pydicom.filereader import read_file_meta_info

    try:
        with quiet_libraries():
            meta = read_file_meta_info(path)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # a malformed meta header is reported by the header pass that follows
        return
    if syntax != DEFLATED:
        return
    limit = max_voxels * BYTES_PER_VOXEL
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as f:
        skip_file_meta(f)
        while chunk := f.read(1 << 16):
            while chunk:
                try:
                    total += len(inflater.decompress(chunk, 1 << 20))
                except zlib.error:
                    raise UnreadableFileError(path, "corrupt deflated DICOM dataset") from None
                if total > limit:
                    raise TooLargeError(path, f"deflated DICOM dataset inflates beyond {limit:,} bytes (the budget of "
                                        f"{max_voxels:,} voxels, --max-voxels): refused without decoding")  # fmt: skip
                chunk = inflater.unconsumed_tail


def skip_file_meta(f: BinaryIO) -> None:
    """Move `f` to the start of the data set: past the preamble and b"DICM" (132 bytes: `read_file_meta_info`
    refuses a file without them) and every element of the file meta group 0002, which is explicit VR little endian
    (PS3.10 7.1); walked element by element, since its group length element is optional."""
    f.seek(132)
    while (head := f.read(8))[:2] == b"\x02\x00" and len(head) == 8:
        if head[4:6] in LONG_VRS:
            f.seek(int.from_bytes(f.read(4), "little"), os.SEEK_CUR)  # after 2 reserved bytes: a 4-byte length
        else:
            f.seek(int.from_bytes(head[6:8], "little"), os.SEEK_CUR)
    f.seek(-len(head), os.SEEK_CUR)


@functools.lru_cache(maxsize=1)
def _library_children(registered: int) -> tuple[logging.Logger, ...]:
    """The loggers below `LIBRARY_LOGGERS`, listed again only when the number of `registered` loggers changed (the
    registry only grows): listing them per file cost more than reading a DICOM header."""
    prefixes = tuple(f"{root}." for root in LIBRARY_LOGGERS)
    return tuple(
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith(prefixes)
    )


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep pydicom's, nibabel's, Pillow's and MONAI's log lines and warnings about a file off the terminal while
    it is read: a broken file becomes one reason in the report, not a traceback in the log."""
    roots = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    children = list(_library_children(len(logging.Logger.manager.loggerDict)))
    saved = [(logger, logger.propagate, logger.disabled) for logger in roots + children]
    sink = logging.NullHandler()  # stops Python's last-resort handler from printing records nobody handles
    for logger in roots:
        logger.propagate = False
        logger.addHandler(sink)
    for logger in roots + children:  # some children have handlers of their own (nibabel.global)
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, propagate, disabled in saved:
            logger.propagate, logger.disabled = propagate, disabled
        for logger in roots:
            logger.removeHandler(sink)


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """A library's read of `path`, quiet (see `quiet_libraries`); any failure becomes one `UnreadableFileError`
    "<what>: <redacted message>". A MemoryError passes through, for the caller to report as such."""
    try:
        with quiet_libraries():
            yield
    except (MemoryError, DataError):
        raise
    except Exception as err:  # the libraries raise many types on broken files
        raise UnreadableFileError(path, f"{what}: {redact(err)}") from None


def redact(err: BaseException) -> str:
    """A library's exception as a reason: one line of at most 300 characters, in which quoted values (header
    text, in the messages of failed value conversions) become '…'. Messages about code (missing attributes or
    decoders) name no header content and are kept whole."""
    message = " ".join(str(err).split())
    if not isinstance(err, (AttributeError, ImportError, NotImplementedError)):
        message = _QUOTED.sub("'…'", message)
    return (message or type(err).__name__)[:300]
