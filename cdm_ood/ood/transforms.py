"""`ScoreOODd`: the OOD verdict as a MONAI dictionary transform, to drop into an existing `Compose`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .api import OODDetector
from .report import IN


class ScoreOODd(MapTransform):
    """Adds `<key>_ood_score` (float, NaN when not scored), `<key>_ood` (bool: True unless the image is in
    distribution), `<key>_ood_verdict` (`in`, `ood` or `flagged`) and `<key>_ood_reason` for each key holding one
    2D image (H, W) or (C, H, W) in its own units, e.g. right after `LoadImaged` + `EnsureChannelFirstd`. The
    rules and reasons are those of the `cdm-ood score` report: NaN/inf or constant pixels are flagged.

    With a 3D model each key holds one whole volume, scored in one forward pass: a MONAI `MetaTensor` (C, X, Y, Z)
    as `LoadImaged` + `EnsureChannelFirstd` (+ `Orientationd(axcodes="RAS")`) make it is turned into the readers'
    (C, D, H, W) = (C, Z, Y, X) (`volume_order`); any other array or tensor is taken as (C, D, H, W)."""

    def __init__(self, keys: KeysCollection, detector: OODDetector, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.detector = detector

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.detector.unit == "volume":
                image = volume_order(image)
            (result,) = self.detector.assess(image[None] if image.ndim == 3 else image)  # one channel-first image
            d[f"{key}_ood_score"] = result["score"]
            d[f"{key}_ood"] = result["verdict"] != IN
            d[f"{key}_ood_verdict"] = result["verdict"]
            d[f"{key}_ood_reason"] = result["reason"]
        return d


def volume_order(image: Any) -> Any:
    """A channel-first volume in the readers' (C, D, H, W) order: a MONAI `MetaTensor` (C, X, Y, Z) is permuted
    (slices along z, rows along y, columns along x); anything else is returned as it is."""
    return image.permute(0, 3, 2, 1) if isinstance(image, MetaTensor) else image
