"""`ScoreOODd`: the OOD verdict as a MONAI dictionary transform, to drop into an existing `Compose`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data.orientation import is_loaded_image, reader_slices
from ..errors import UsageError
from .api import OODDetector
from .report import FLAGGED, IN, aggregate, volume_rows
from .volume_checks import STATISTICS


class ScoreOODd(MapTransform):
    """Adds `<key>_ood_score` (float, NaN when not scored), `<key>_ood` (bool: True unless the image is in
    distribution), `<key>_ood_verdict` (`in`, `ood` or `flagged`) and `<key>_ood_reason` for each key, right after
    `LoadImaged` + `EnsureChannelFirstd` (+ `Orientationd`). The rules and reasons are those of the `cdm-ood
    score` report: NaN/inf or constant pixels are flagged.

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
            if self.detector.unit == "volume":
                volume = np.moveaxis(reader_slices(image), 0, 1) if is_loaded_image(image) else image
                (result,) = self.detector.assess(volume[None] if volume.ndim == 4 else volume)  # one (C, D, H, W)
            elif is_loaded_image(image) and image.ndim == 4:
                result = self._score_volume(reader_slices(image), d, key)
            elif image.ndim == 4:
                raise UsageError(f"{key!r} holds a volume {tuple(image.shape)} without the metadata of MONAI "
                                 "LoadImage: the orientation of its slices is unknown")  # fmt: skip
            else:
                image = reader_slices(image)[0] if is_loaded_image(image) else image
                (result,) = self.detector.assess(image[None] if image.ndim == 3 else image)  # one image
            d[f"{key}_ood_score"] = result["score"]
            d[f"{key}_ood"] = result["verdict"] != IN
            d[f"{key}_ood_verdict"] = result["verdict"]
            d[f"{key}_ood_reason"] = result["reason"]
        return d

    def _score_volume(self, slices: np.ndarray, d: dict[Hashable, Any], key: Hashable) -> dict[str, Any]:
        """Scores every slice (D, C, H, W) into `d` and returns the volume's result, by `report.volume_rows`."""
        results = self.detector.assess(slices)
        d[f"{key}_ood_slice_scores"] = np.array([r["score"] for r in results])
        d[f"{key}_ood_slice_verdicts"] = [r["verdict"] for r in results]
        rows = [{"level": "slice", "volume": str(key), "path": str(key), "slice": k, "time_point": None,
                 "verdict": r["verdict"], "score": None if r["verdict"] == FLAGGED else r["score"],
                 **{c: r[c] for c in STATISTICS}} for k, r in enumerate(results)]  # fmt: skip
        (volume,) = volume_rows(rows, self.detector.threshold, self.per_volume, self.detector.checks)
        return {**volume, "score": float("nan") if volume["score"] is None else volume["score"]}
