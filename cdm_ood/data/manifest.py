"""The manifest of a `make-phantoms` set (`manifest.csv`: one row per volume, its set and parameters) and what
reads it: the volumes by set, the defect volumes and their masks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

MANIFEST_COLUMNS = (
    "path",
    "volume_id",
    "format",
    "modality",
    "artifact",
    "strength",
    "parameter",
    "n_slices",
    "size",
    "seed",
)
MASK_COLUMN = "mask"  # the defect's mask, relative to the manifest's folder: a manifest column with `defects`


def is_manifest(path: str | Path) -> bool:
    """True for a `make-phantoms` manifest: a .csv file whose header holds the manifest's columns."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return set(MANIFEST_COLUMNS) <= set(next(csv.reader(f), []))


def manifest_masks(path: str | Path) -> dict[Path, Path]:
    """The defect volumes of a `make-phantoms --defects` manifest and their masks (rows with a `mask`), paths
    relative to the manifest's folder."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {path.parent / row["path"]: path.parent / row[MASK_COLUMN] for row in rows if row.get(MASK_COLUMN)}


def read_mask(path: str | Path) -> np.ndarray:
    """A defect mask of `make_phantoms(defects=True)` as a boolean `mask[k, row, col]`: slice k lines up, pixel for
    pixel, with slice k that the readers give of its volume (a DICOM series or a NIfTI volume of `make_phantoms`),
    whatever the mask's affine says about world space."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0).astype(bool)


def manifest_sets(path: str | Path) -> dict[str, list[Path]]:
    """The volumes of a `make-phantoms` manifest by set: `clean`, `<artifact>-<strength>` for each corruption and
    `<artifact>` for each row without a strength (orientation errors, wrong-modality files); paths relative to the
    manifest's folder."""
    path = Path(path)
    sets: dict[str, list[Path]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            artifact, strength = row["artifact"], row["strength"]
            name = "clean" if artifact == "none" else f"{artifact}-{strength}" if strength else artifact
            sets.setdefault(name, []).append(path.parent / row["path"])
    return sets
