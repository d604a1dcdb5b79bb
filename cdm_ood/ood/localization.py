"""Where the anomaly maps point, measured on the local defects of a `make-phantoms --defects` manifest: each defect
volume's map on its own grid (the readers' slices, `map_outputs.to_native`) against its mask (`manifest.read_mask`,
lined up with those slices), with `metrics.localization_metrics` per defect and over all defects. A defect is a
volume: its peak is the highest voxel of the volume's map, and its pixels are all of the volume's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.manifest import manifest_masks, manifest_sets, read_mask
from ..data.volumes import iter_inputs
from ..errors import UsageError
from .api import OODDetector
from .map_outputs import to_native
from .metrics import localization_metrics

ALL = "all"  # the key of the metrics over every defect


def defect_maps(detector: OODDetector, path: str | Path) -> np.ndarray:
    """The anomaly map (D, H, W) of one volume (a NIfTI file or a DICOM series folder) on its own grid, slice k
    being the readers' slice k; NaN where a slice was not scored."""
    images = list(iter_inputs(Path(path), detector.model.spec.spatial_dims))
    maps = detector.anomaly_maps(images)
    if detector.unit == "volume":
        return to_native(maps[0], images[0].image.shape[-3:])
    return np.stack([to_native(m, s.image.shape[-2:]) for m, s in zip(maps, images, strict=True)])


def localize_defects(detector: OODDetector, manifest: str | Path) -> dict[str, dict[str, float]]:
    """`pixel_auroc` and `peak_in_mask` (`localization_metrics`) of the detector's maps on the defect volumes of
    `manifest`, per defect set and over all of them (`ALL`); slices that were not scored count as lowest."""
    masks = manifest_masks(manifest)
    if not masks:
        raise UsageError(f"{manifest}: no defect masks (write the phantoms with make-phantoms --defects)")
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, paths in manifest_sets(manifest).items():
        for path in (p for p in paths if p in masks):
            amap = defect_maps(detector, path)
            pairs.setdefault(name, []).append((np.nan_to_num(amap, nan=-np.inf), read_mask(masks[path])))
    pairs[ALL] = [pair for group in pairs.values() for pair in group]
    return {name: localization_metrics(*zip(*group, strict=True)) for name, group in pairs.items()}
