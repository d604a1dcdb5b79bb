"""The calibration made at the end of training: `calibration.calibrate_images` (every detector and volume check, held
out by volume) on the validation split, which the training data already holds in model space. `cdm-ood train` passes
it to `training.train` as a finish hook, so a fresh `model.pt` gates as it would after `cdm-ood calibrate` on the
same images."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from monai.data import DataLoader

from ..errors import UsageError
from ..ood.calibration import MIN_IMAGES, calibrate_images, calibration_features
from ..ood.features import batched_features

if TYPE_CHECKING:
    from ..diffusion.schedules import NoiseSchedule
    from .config import Config
    from .training import TrainingData

log = logging.getLogger("cdm_ood.calibration")


def calibrate_on_validation(
    model: torch.nn.Module, data: TrainingData, config: Config, schedule: NoiseSchedule, device: torch.device
) -> dict[str, Any]:
    """The checkpoint entry `calibration` from the validation split's images (their volume ids and slice indices
    from the samples' provenance; natural images each their own volume), features computed in float32; none, with
    a warning, when no calibration can be made from them (too few scorable images)."""
    spec = config.model_spec(data.preset)
    metas = [sample["meta"] for sample in data.val.data]
    if len(metas) < MIN_IMAGES:
        log.warning("OOD thresholds not calibrated (%d validation images, needs %d): run `cdm-ood calibrate` on "
                    "in-distribution data", len(metas), MIN_IMAGES)  # fmt: skip
        return {}
    volumes = [m.get("volume_id", ("validation", k)) for k, m in enumerate(metas)]
    slots = [((m["volume_id"], None if m["time_point"] < 0 else m["time_point"]), m["index"])
             if spec.unit == "slice" and "volume_id" in m else None for m in metas]  # fmt: skip
    images = (batch["image"] for batch in DataLoader(data.val, batch_size=config.train.batch_size, shuffle=False))
    num_classes = config.model.num_classes
    features = batched_features(model, images, schedule, calibration_features(spec, num_classes), num_classes, device)
    try:
        calibration = calibrate_images(features, volumes, slots, spec.num_dims, spec.bit_depth,
                                       num_classes=num_classes)  # fmt: skip
    except UsageError as err:
        log.warning("OOD thresholds not calibrated (%s): run `cdm-ood calibrate` on in-distribution data", err)
        return {}
    log.info("calibrated OOD thresholds on %d validation images (fpr %.2f)", len(metas), calibration.fpr)
    return {"calibration": calibration.to_dict()}
