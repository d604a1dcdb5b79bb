"""Training data from a folder of DICOM / NIfTI scans, split by series or volume, never by slice."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ..errors import UsageError
from ..utils.io import write_csv_atomic
from .discovery import ErrorHandler, PathLike
from .errors import DataError
from .readers import iter_slices
from .records import FLAG_NONFINITE, Slice, Volume, header_flags
from .volumes import stack_volumes

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "volume_id", "split", "n_slices", "n_flagged")


def split_volumes(volume_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict:
    """volume id -> 'train' | 'val' | 'test' by a seeded shuffle of the distinct ids.

    Whole volumes go to one split, so no scan has slices on both sides. With three or more volumes, val and
    test get at least one each; train always gets at least one.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise UsageError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = sorted(set(volume_ids))
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val, n_test = (round(n * f) for f in fractions[1:])
    if n >= 3:
        n_val, n_test = max(n_val, int(fractions[1] > 0)), max(n_test, int(fractions[2] > 0))
    n_val, n_test = min(n_val, max(n - 1, 0)), min(n_test, max(n - 1 - n_val, 0))
    return {vid: ("val" if k < n_val else "test" if k < n_val + n_test else "train") for k, vid in enumerate(order)}


def sample(slice_: Slice | Volume, label: int = -1) -> dict[str, Any]:
    """The project's dict sample for a slice or a volume: image, label, and collatable provenance (no patient data)."""
    src = slice_.source
    meta = {
        "path": src.path,
        "index": src.index,
        "volume_id": src.volume_id,
        "sop_instance_uid": src.sop_instance_uid or "",
        "time_point": -1 if src.time_point is None else src.time_point,
    }
    return {"image": slice_.image, "label": label, "meta": meta}


def medical_dataset(
    root: PathLike | Sequence[PathLike],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    manifest: Optional[PathLike] = None,
    on_error: Optional[ErrorHandler] = None,
    volumes: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """All scans below `root` as MONAI-ready dict samples per split, split by volume (`split_volumes`).

    With `volumes=False` each sample is a 2D slice; slices flagged as constant or non-finite are left out (and
    counted). With `volumes=True` each sample is a whole (C, D, H, W) volume (one per time point of a 4D file);
    volumes with a non-finite slice are left out. With `manifest`, a CSV of every file with its volume, split and
    slice counts is written atomically.
    """
    by_volume: dict[str, list[Slice]] = defaultdict(list)
    for s in iter_slices(root, on_error=on_error):
        by_volume[s.source.volume_id].append(s)
    if not by_volume:
        raise UsageError(f"{root}: no readable scans to train on (set data.root to a folder of DICOM/NIfTI scans)")
    assignment = split_volumes(list(by_volume), fractions, seed)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    rows: dict[str, dict[str, Any]] = {}
    for volume_id, slices in by_volume.items():
        split = assignment[volume_id]
        for s in slices:
            row = rows.setdefault(
                s.source.path,
                {"path": s.source.path, "volume_id": volume_id, "split": split, "n_slices": 0, "n_flagged": 0},
            )
            row["n_slices"] += 1
            row["n_flagged"] += bool(s.flags)
        splits[split] += _volume_samples(slices) if volumes else [sample(s) for s in slices if not s.flags]
    if manifest is not None:
        write_csv_atomic(manifest, MANIFEST_COLUMNS, sorted(rows.values(), key=lambda r: (r["split"], r["path"])))
    return splits


def _volume_samples(slices: list[Slice]) -> list[dict[str, Any]]:
    """One (C, D, H, W) sample per time point of a volume (`volumes.stack_volumes`: slices in index order); volumes
    with a non-finite voxel, a header flag (`headers`) or slices of different sizes are left out."""
    try:
        stacked = stack_volumes(slices)
    except DataError:
        return []
    return [sample(v) for v in stacked if FLAG_NONFINITE not in v.flags and not header_flags(v.flags)]
