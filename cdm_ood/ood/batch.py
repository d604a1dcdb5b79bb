"""Scoring a folder of scans: DataLoader workers read and prepare files, the main process scores batches.

A file that cannot be read (or mapped to the model) becomes an `unreadable` row with its reason and the
batch goes on; inputs are only ever opened for reading. A 3D model scores whole volumes (`cdm_ood.data.volumes`):
one row per volume; a volume with a file that cannot be read is not scored (its files get `unreadable` rows).
Given a `MapWriter`, each scored batch also gets its anomaly maps, written beside nothing but the writer's folder; a
map that cannot be written becomes a `flagged` row of its volume (`report.map_failure_row`), never the run's failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.discovery import SourceFile
from ..data.errors import DataError, UnreadableFileError
from ..data.guards import redact
from ..data.readers import read_source
from ..data.records import Slice, SliceSource, Volume
from ..data.volumes import read_volume, volume_groups
from ..data.walk import IgnoredFile
from .map_outputs import MapWriter
from .report import error_row, flag_noted, ignored_row, map_failure_row, volume_rows
from .scoring import ImageScorer
from .thresholds import Thresholds

# The model-space images of one item (None for flagged ones) with the images read (when kept, for maps), the
# errors of its files, its files.
Prepared = tuple[
    list[tuple[SliceSource, tuple[str, ...], Optional[torch.Tensor], Optional[Slice | Volume]]],
    list[DataError],
    list[SourceFile],
]


class PreparedFiles(Dataset):
    """Item i: the model-space slices of discovered file i, or with `volumes` the model-space volumes of the i-th
    volume's files (`volume_groups`), with the errors of its files; with `keep_images` also the images read."""

    def __init__(
        self,
        sources: Sequence[SourceFile],
        transform: Callable[[Any], torch.Tensor],
        volumes: bool = False,
        keep_images: bool = False,
    ) -> None:
        self.items = volume_groups(sources) if volumes else [[s] for s in sources]
        self.transform, self.volumes, self.keep_images = transform, volumes, keep_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        files, errors = self.items[i], []
        try:
            images: Sequence[Slice | Volume] = (
                read_volume(files, errors.append) if self.volumes else read_source(files[0])
            )
        except DataError as err:
            errors.append(err)
        if errors:
            return [], errors, files
        try:
            kept = [(s.source, s.flags, None if s.flags else self.transform(s.image)) for s in images]
        except (ValueError, RuntimeError, MemoryError) as err:
            reason = "out of memory" if isinstance(err, MemoryError) else redact(err)
            path = images[0].source.path
            return [], [UnreadableFileError(path, f"cannot be mapped to the model's input: {reason}")], files
        return [(*k, s if self.keep_images else None) for k, s in zip(kept, images, strict=True)], [], files


def _as_is(item: Prepared) -> Prepared:
    return item


def _handed_over(loader: DataLoader) -> Iterator[Prepared]:
    """The loader's items; a reader process that dies while it hands a batch's tensors over (the connection resets
    under the scoring process) is named as what it is."""
    try:
        yield from loader
    except (ConnectionError, EOFError) as err:
        raise RuntimeError(f"a DataLoader worker (reader process) died while handing over a batch ({err})") from err


def _quiet_reader(worker_id: int) -> None:
    """In a reader process: the scoring process hanging up while it fetched a batch's tensors (it was stopped:
    Ctrl-C, SIGTERM) is no failure of the reader's, and prints no traceback; the scoring process says why it
    stopped. Any other error is printed as before."""
    default = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        if not issubclass(kind, (EOFError, ConnectionError)):
            default(kind, value, tb)

    sys.excepthook = hook


def auto_workers(device: torch.device) -> int:
    """DataLoader processes for reading files, from the cores this process may use: on a GPU, half of them (at most
    8; the network does not need them); on CPU, those that torch's own threads leave free (at most 4), because a
    reader on a core the network uses only slows both."""
    cores = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        return min(8, cores // 2)
    return max(0, min(4, cores - torch.get_num_threads()))


def score_sources(
    scorer: ImageScorer,
    thresholds: Thresholds,
    sources: Sequence[SourceFile],
    errors: Sequence[DataError],
    per_volume: str = "mean",
    workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    ignored: Sequence[IgnoredFile] = (),
) -> list[dict]:
    """Report rows: every slice of `sources`, every file in `errors` or failing to read, every file the ignore
    globs left out (`ignored`), then one row per volume.

    `progress(n)` is called with the number of files just handled. A 3D model gives one row per volume instead of
    slice rows (`per_volume` does not apply).
    """
    rows = [row for group in iter_scored(scorer, thresholds, sources, errors, workers, progress) for row in group]
    return report_rows([*rows, *map(ignored_row, ignored)], thresholds, per_volume)


def report_rows(rows: list[dict], thresholds: Thresholds, per_volume: str) -> list[dict]:
    """File and slice rows in a fixed order (path, time point, slice), then one row per volume (with the volume
    checks of `thresholds`); a volume with a map that could not be written is `flagged` (`report.flag_noted`)."""
    rows = sorted(rows, key=lambda r: (r["path"], r["time_point"] or 0, r["slice"] or 0))
    return flag_noted(rows + volume_rows(rows, thresholds.score, per_volume, thresholds.checks))


def iter_scored(
    scorer: ImageScorer,
    thresholds: Thresholds,
    sources: Sequence[SourceFile],
    errors: Sequence[DataError],
    workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    maps: Optional[MapWriter] = None,
) -> Iterator[list[dict]]:
    """Rows of whole files, one group per scored batch (the files in `errors` first), so that a caller can
    save each group as soon as it is complete. With `maps`, the anomaly map of every scored image is written
    (`ImageScorer.scored_prepared`: the features are computed once for both); each map that could not be written
    adds a `flagged` file row of its volume to the group (`report.map_failure_row`)."""
    threshold = thresholds.score
    if errors:
        yield [error_row(err) for err in errors]
    volumes = scorer.unit == "volume"
    prepared = PreparedFiles(sources, scorer.transform, volumes, keep_images=maps is not None)
    pin = workers > 0 and scorer.device.type == "cuda"  # pinned pages: the copies to the GPU overlap reading
    loader = DataLoader(prepared, batch_size=None, num_workers=workers, collate_fn=_as_is, pin_memory=pin,
                        worker_init_fn=_quiet_reader)  # fmt: skip
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor, Optional[Slice | Volume], list[SourceFile]]] = []

    def flush() -> None:
        if pending:
            x = torch.stack([p[1] for p in pending])
            scores, statistics, amaps = scorer.scored_prepared(x, maps is not None)
            for i, (index, *_) in enumerate(pending):
                stats = {c: float(v[i]) for c, v in statistics.items()}
                rows[index] = scorer.report_row(rows[index]["source"], float(scores[i]), threshold, statistics=stats)
            if maps is not None and amaps is not None:
                for (_, _, image, files), amap in zip(pending, amaps, strict=True):
                    if volumes:
                        maps.write_volume(amap, image, files)
                    else:
                        maps.write(amap, image)
                rows.extend(map_failure_row(f.source, f.reason, f.whole) for f in maps.pop_failures())
            pending.clear()

    for items, errs, files in _handed_over(loader):
        rows += [error_row(err) for err in errs]
        for source, flags, x, image in items:
            rows.append(scorer.report_row(source, None, threshold, flags) if flags else {"source": source})
            if x is not None:
                pending.append((len(rows) - 1, x, image, files))
        if progress is not None:
            progress(len(files))
        if len(pending) >= scorer.batch_size:
            flush()
            yield rows
            rows = []
    flush()
    if maps is not None:
        maps.finish()
        rows.extend(map_failure_row(f.source, f.reason, f.whole) for f in maps.pop_failures())
    if rows:
        yield rows
