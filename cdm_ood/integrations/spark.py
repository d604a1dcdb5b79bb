"""`cdm-ood score` on Spark: a DataFrame of file paths, or of binary files (`spark.read.format("binaryFile")`),
scored with `mapInPandas` by the same discovery, readers, model and report rows (`ood.batch.score_sources`).

Two steps, both `mapInPandas`: every file gets a key read from its header (its DICOM series; the header of a
NIfTI .hdr/.img pair; else the file itself) and the files are repartitioned by it, so that a volume lies whole in one
partition; then each partition is scored as `cdm-ood score` scores a folder. Slice indices, volume ids and per-volume
rows are therefore those of the report. Needs the `spark` extra (`pip install 'cdm-ood[spark]'`).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from ..data.discovery import discover
from ..data.errors import DataError
from ..data.formats import reader_of
from ..data.guards import MAX_VOXELS
from ..data.walk import DEFAULT_IGNORE, IgnoredFile, ignore_match
from ..errors import MissingExtraError
from ..ood.report import COLUMNS, FLOAT_COLUMNS, aggregate
from ..ood.staging import StagedFiles

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

    from ..ood.scoring import ImageScorer
    from ..ood.thresholds import Thresholds

_TYPES = {"slice": "bigint", "time_point": "bigint"} | dict.fromkeys(FLOAT_COLUMNS, "double")
SCHEMA = ", ".join(f"{column} {_TYPES.get(column, 'string')}" for column in COLUMNS)
"""The rows' schema (Spark DDL): the columns of the `cdm-ood score` report, in its order."""
_KEYED = "path string, content binary, volume_key string, ignored string"


@dataclass(frozen=True)
class _Job:
    """What every executor needs: the checkpoint's path (never its weights) and the scoring options."""

    checkpoint: str
    stamp: int  # the checkpoint's modification time: a rewritten checkpoint is loaded again
    detector: Optional[str]
    threshold: str | float
    per_volume: str
    batch_size: int
    device: Optional[str]
    max_voxels: int


def score_files(
    files: DataFrame,
    checkpoint: str | os.PathLike,
    path_col: str = "path",
    content_col: str = "content",
    detector: Optional[str] = None,
    threshold: str | float = "auto",
    per_volume: str = "mean",
    batch_size: int = 64,
    device: Optional[str] = None,
    max_voxels: int = MAX_VOXELS,
    partitions: Optional[int] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> DataFrame:
    """The report rows (`SCHEMA`) of the files in `files`, as `cdm-ood score` writes them for the same files: one
    per slice, one per file that cannot be read (with its reason) and one per volume.

    `files` has a column `path_col` of paths that every executor can read (a shared or mounted file system), or is
    a binaryFile DataFrame: when it has a `content_col` column its bytes are scored (written to a temporary folder
    under their own names) and the rows name the files by the DataFrame's paths (URIs such as `file:/...`).
    The model is loaded from `checkpoint` (a path every executor can read) once per Python worker; the driver loads
    it once first, so that an unusable checkpoint or threshold fails here, before any file is read. `device`
    defaults to cuda where the executor has a GPU, else cpu. The files are scored in `partitions` partitions
    [default: `spark.sql.shuffle.partitions`], a number adaptive query execution keeps. Files whose name or path
    matches an `ignore` glob are not read and get a row `ignored`, as in a folder given to `cdm-ood score`
    (`data.walk.DEFAULT_IGNORE`).
    """
    _require_pyspark()
    from pyspark.sql import functions as F

    aggregate(per_volume)
    stamp = os.stat(checkpoint).st_mtime_ns if os.path.isfile(checkpoint) else 0
    job = _Job(str(checkpoint), stamp, detector, threshold, per_volume, batch_size, device, max_voxels)
    _scorer(job)
    content = F.col(content_col) if content_col in files.columns else F.lit(None).cast("binary")
    keyed = files.select(F.col(path_col).alias("path"), content.alias("content")).mapInPandas(
        functools.partial(_with_volume_keys, max_voxels=max_voxels, ignore=tuple(ignore)), _KEYED
    )
    partitions = partitions or int(files.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    return keyed.repartition(partitions, "volume_key").mapInPandas(functools.partial(_score_partition, job=job), SCHEMA)


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise MissingExtraError("pyspark", "spark") from None


@functools.lru_cache(maxsize=1)
def _scorer(job: _Job) -> tuple[ImageScorer, Thresholds]:
    """The scorer of `job` and its thresholds, loaded and resolved once per process (an uncalibrated checkpoint
    stops)."""
    from ..model.checkpoint import load_model
    from ..ood.scoring import ImageScorer
    from ..ood.thresholds import Thresholds
    from ..utils.distributed import resolve_device

    model = load_model(job.checkpoint, job.device or resolve_device())
    scorer = ImageScorer(model, job.detector, batch_size=job.batch_size)
    return scorer, Thresholds.resolve(scorer, job.threshold)


def _volume_key(path: str, local: Path, max_voxels: int) -> str:
    """The key that brings a volume's files into one partition: the DICOM series, the .hdr of a NIfTI .img, else
    the file itself (also for a file that cannot be read: it is reported on its own)."""
    if path.lower().endswith(".img"):
        return path[:-4] + ".hdr"
    try:
        found = discover(local, max_voxels=max_voxels)
    except DataError:
        return path
    return found[0].volume_id if len(found) == 1 and reader_of(found[0].format).series else path


def _with_volume_keys(
    batches: Iterator[pd.DataFrame], max_voxels: int, ignore: Sequence[str]
) -> Iterator[pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="cdm-ood-spark-") as tmp:
        staged = StagedFiles(Path(tmp))
        for batch in batches:
            keys, patterns = [], []
            for path, content in zip(batch["path"], batch["content"], strict=True):
                local_path = Path(urlsplit(path).path)
                patterns.append(ignore_match(local_path, ignore, local_path.parent.parts))
                if patterns[-1] is not None:  # reported as `ignored` on its own, never read
                    keys.append(path)
                    continue
                local = staged.add(path, content)
                keys.append(_volume_key(path, local, max_voxels))
                if content is not None:
                    local.unlink()
            yield batch.assign(volume_key=keys, ignored=patterns)


def _score_partition(batches: Iterator[pd.DataFrame], job: _Job) -> Iterator[pd.DataFrame]:
    import pandas as pd

    from ..ood.batch import score_sources

    with tempfile.TemporaryDirectory(prefix="cdm-ood-spark-") as tmp:
        staged = StagedFiles(Path(tmp))
        paths, ignored = [], []
        for batch in batches:
            for path, content, pattern in zip(batch["path"], batch["content"], batch["ignored"], strict=True):
                if not isinstance(pattern, str):  # null: not ignored
                    paths.append(staged.add(path, content))
                else:
                    ignored.append(IgnoredFile(path, pattern))
        if not paths and not ignored:
            return
        errors: list[DataError] = []
        sources = discover(paths, errors.append, job.max_voxels) if paths else []
        scored = score_sources(*_scorer(job), sources, errors, job.per_volume, ignored=ignored)
        rows = [staged.restore(row) for row in scored]
    yield pd.DataFrame(rows, columns=list(COLUMNS)).astype({"slice": "Int64", "time_point": "Int64"})
