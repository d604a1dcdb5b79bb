"""`ScoreOODd`: the OOD verdict as a MONAI dictionary transform, to drop into an existing `Compose`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from .api import OODDetector


class ScoreOODd(MapTransform):
    """Adds `<key>_ood_score` (float) and `<key>_ood` (bool) for each key holding one 2D image (H, W) or
    (C, H, W) in its own units, e.g. right after `LoadImaged` + `EnsureChannelFirstd`."""

    def __init__(self, keys: KeysCollection, detector: OODDetector, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.detector = detector

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            score = float(self.detector.score(d[key])[0])
            d[f"{key}_ood_score"] = score
            d[f"{key}_ood"] = score > self.detector.threshold
        return d
