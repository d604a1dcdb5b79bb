"""Scoring a folder of scans: DataLoader workers read and prepare files, the main process scores batches.

A file that cannot be read (or mapped to the model) becomes an `unreadable` row with its reason and the
batch goes on; inputs are only ever opened for reading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.discovery import SourceFile
from ..data.errors import DataError, UnreadableFileError
from ..data.guards import redact
from ..data.readers import read_source
from ..data.records import SliceSource
from .api import OODDetector
from .report import error_row, slice_row, volume_rows

Prepared = tuple[list[tuple[SliceSource, tuple[str, ...], Optional[torch.Tensor]]], Optional[DataError]]


class PreparedFiles(Dataset):
    """Item i: the model-space slices of discovered file i (None for flagged ones), or its DataError."""

    def __init__(self, sources: Sequence[SourceFile], transform: Callable[[Any], torch.Tensor]) -> None:
        self.sources, self.transform = list(sources), transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Prepared:
        source = self.sources[i]
        try:
            slices = read_source(source)
        except DataError as err:
            return [], err
        try:
            return [(s.source, s.flags, None if s.flags else self.transform(s.image)) for s in slices], None
        except (ValueError, RuntimeError, MemoryError) as err:
            reason = "out of memory" if isinstance(err, MemoryError) else redact(err)
            return [], UnreadableFileError(source.path, f"cannot be mapped to the model's input: {reason}")


def _as_is(item: Prepared) -> Prepared:
    return item


def score_sources(
    detector: OODDetector,
    sources: Sequence[SourceFile],
    errors: Sequence[DataError],
    per_volume: str = "mean",
    workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> list[dict]:
    """Report rows: every slice of `sources`, every file in `errors` or failing to read, then one row per volume.

    `progress(n)` is called with the number of files just handled.
    """
    rows = [row for group in iter_scored(detector, sources, errors, workers, progress) for row in group]
    return report_rows(rows, detector.threshold, per_volume)


def report_rows(rows: list[dict], threshold: float, per_volume: str) -> list[dict]:
    """File and slice rows in a fixed order (path, time point, slice), then one row per volume."""
    rows = sorted(rows, key=lambda r: (r["path"], r["time_point"] or 0, r["slice"] or 0))
    return rows + volume_rows(rows, threshold, per_volume)


def iter_scored(
    detector: OODDetector,
    sources: Sequence[SourceFile],
    errors: Sequence[DataError],
    workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> Iterator[list[dict]]:
    """Rows of whole files, one group per scored batch (the files in `errors` first), so that a caller can
    save each group as soon as it is complete."""
    threshold = detector.threshold
    if errors:
        yield [error_row(err) for err in errors]
    loader = DataLoader(
        PreparedFiles(sources, detector.transform), batch_size=None, num_workers=workers, collate_fn=_as_is
    )
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            scores = detector.score_prepared(torch.stack([x for _, x in pending]))
            for (index, _), score in zip(pending, scores.tolist(), strict=True):
                rows[index] = slice_row(rows[index]["source"], score, threshold)
            pending.clear()

    for items, err in loader:
        if err is not None:
            rows.append(error_row(err))
        for source, flags, x in items:
            rows.append(slice_row(source, None, threshold, flags) if flags else {"source": source})
            if x is not None:
                pending.append((len(rows) - 1, x))
        if progress is not None:
            progress(1)
        if len(pending) >= detector.batch_size:
            flush()
            yield rows
            rows = []
    flush()
    if rows:
        yield rows
