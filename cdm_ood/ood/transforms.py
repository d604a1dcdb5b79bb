"""`ScoreOODd`: the OOD verdict as a MONAI dictionary transform, to drop into an existing `Compose`."""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data.discovery import discover
from ..data.errors import DataError
from ..data.formats import reader_of
from ..data.formats.dicom import MONOCHROME1_LOADED  # noqa: F401  (the reason `loaded_slices` gives MONOCHROME1)
from ..data.orientation import is_loaded_image, reader_slices
from ..data.records import Slice, SliceSource, Volume
from ..errors import UsageError
from .api import OODDetector
from .report import FLAGGED, IN, aggregate, volume_rows
from .volume_checks import STATISTICS


class ScoreOODd(MapTransform):
    """Adds `<key>_ood_score` (float, NaN when not scored), `<key>_ood` (bool: True unless the image is in
    distribution), `<key>_ood_verdict` (`in`, `ood` or `flagged`) and `<key>_ood_reason` for each key, right after
    `LoadImaged` + `EnsureChannelFirstd` (+ `Orientationd`). The rules and reasons are those of the `cdm-ood
    score` report: NaN/inf or constant pixels are flagged, and so is a loaded image whose file's header disagrees
    with itself (`cdm_ood.data.headers`, read from the file LoadImage names) or that is MONOCHROME1 DICOM (whether
    LoadImage inverted it depends on its reader: `MONOCHROME1_LOADED`).

    A key holds one 2D image ((H, W) or (C, H, W), rows first) or what `LoadImaged` loaded: a 2D image or a whole
    volume, cut into the slices `cdm-ood score` reads from the same file (`cdm_ood.data.orientation`). With a 2D
    model a volume also gets `<key>_ood_slice_scores` (D,) and `<key>_ood_slice_verdicts`, and its score and
    verdict are those of the report's volume row (`per_volume` aggregate of the slice scores, as `cdm-ood score
    --per-volume`). With a 3D model each key holds one whole volume, scored in one forward pass: a loaded one
    stacked from those slices into (C, D, H, W), any other array or tensor taken as (C, D, H, W)."""

    def __init__(
        self, keys: KeysCollection, detector: OODDetector, per_volume: str = "mean", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.detector, self.per_volume = detector, per_volume
        aggregate(per_volume)  # an unknown aggregate is refused here, not at the first volume

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            loaded = loaded_slices(image) if is_loaded_image(image) else None
            if self.detector.unit == "volume":
                if loaded is not None:  # one (C, D, H, W) volume with its slices' flags
                    flags = tuple(dict.fromkeys(f for s in loaded for f in s.flags))
                    target: Any = Volume(np.stack([s.image for s in loaded], axis=1), loaded[0].source, flags)
                else:
                    target = image[None] if image.ndim == 4 else image  # one (C, D, H, W)
                (result,) = self.detector.assess(target)
            elif loaded is not None and image.ndim == 4:
                result = self._score_volume(loaded, d, key)
            elif image.ndim == 4:
                raise UsageError(f"{key!r} holds a volume {tuple(image.shape)} without the metadata of MONAI "
                                 "LoadImage: the orientation of its slices is unknown")  # fmt: skip
            else:
                (result,) = self.detector.assess(loaded[0] if loaded else image[None] if image.ndim == 3 else image)
            d[f"{key}_ood_score"] = result["score"]
            d[f"{key}_ood"] = result["verdict"] != IN
            d[f"{key}_ood_verdict"] = result["verdict"]
            d[f"{key}_ood_reason"] = result["reason"]
        return d

    def _score_volume(self, slices: list[Slice], d: dict[Hashable, Any], key: Hashable) -> dict[str, Any]:
        """Scores every slice into `d` and returns the volume's result, by `report.volume_rows`."""
        results = self.detector.assess(slices)
        d[f"{key}_ood_slice_scores"] = np.array([r["score"] for r in results])
        d[f"{key}_ood_slice_verdicts"] = [r["verdict"] for r in results]
        rows = [{"level": "slice", "volume": str(key), "path": str(key), "slice": k, "time_point": None,
                 "verdict": r["verdict"], "reason": r["reason"],
                 "score": None if r["verdict"] == FLAGGED else r["score"], **{c: r[c] for c in STATISTICS}}
                for k, r in enumerate(results)]  # fmt: skip
        (volume,) = volume_rows(rows, self.detector.threshold, self.per_volume, self.detector.checks)
        return {**volume, "score": float("nan") if volume["score"] is None else volume["score"]}


PARTS_LOADED = ("LoadImage stacked a DICOM series that is {n} volumes (its slices differ in image type, echo, time "
                "point, orientation, size or spacing) as one image; score its files by path")  # fmt: skip


def loaded_slices(image: Any) -> list[Slice]:
    """The slices (`reader_slices`) of a MONAI-loaded image with the flags `cdm-ood score` gives them: the header
    flags of the file(s) LoadImage names (discovery's header pass; a DICOM series slice by slice, in the readers'
    order, else the file's flags on every slice; a file that fails it flags every slice with its reason),
    `MONOCHROME1_LOADED` for MONOCHROME1 DICOM, and `PARTS_LOADED` on every slice of a series that `cdm-ood score`
    splits into volumes (`data.series`): LoadImage stacked them as one."""
    slices = reader_slices(image)
    name = image.meta["filename_or_obj"]
    names = [str(n) for n in name] if isinstance(name, (list, tuple)) else [str(name)]
    errors: list[DataError] = []
    sources = discover(names, errors.append, max_voxels=sys.maxsize)  # loaded already: no budget to keep
    per_file = [(*s.flags, *reader_of(s.format).loaded_flags(s.path)) for s in sources]
    parts = {s.volume_id for s in sources if s.part}
    if parts:
        per_file = [(*flags, PARTS_LOADED.format(n=len(parts))) for flags in per_file]
    every = tuple(dict.fromkeys([*(f for flags in per_file for f in flags), *(e.reason for e in errors)]))
    flags = per_file if len(per_file) == len(slices) and not errors and not parts else [every] * len(slices)
    return [Slice(s, SliceSource(names[0], k, names[0]), f) for k, (s, f) in enumerate(zip(slices, flags, strict=True))]
