"""Model-input preprocessing with MONAI transforms: channels, intensity preset, size, dtype (array transforms with
dictionary wrappers, as in MONAI). Works on 2D slices (C, H, W) and 3D volumes (C, D, H, W)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureType, MapTransform, Resize, Transform

from ..errors import UsageError
from .presets import IntensityPreset

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


class ToChannels(Transform):
    """(C, H, W) -> (channels, H, W): RGB to luma (BT.601) for 1 channel, grey replicated for 3; else an error."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        have = img.shape[0]
        if have == self.channels:
            return img
        if have == 3 and self.channels == 1:
            return LUMA[0] * img[0:1] + LUMA[1] * img[1:2] + LUMA[2] * img[2:3]
        if have == 1 and self.channels == 3:
            return img[[0, 0, 0]]
        raise ValueError(f"cannot turn an image with {have} channels into {self.channels}")


class ToChannelsd(MapTransform):
    """Dictionary wrapper of `ToChannels`."""

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ToChannels(channels)

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


def check_spatial_size(spatial_size: Sequence[int], multiple: int = 4) -> tuple[int, ...]:
    """(H, W) or (D, H, W), each a positive multiple of `multiple` (the UNet halves the size at every level)."""
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in (2, 3) or any(s <= 0 or s % multiple for s in size):
        raise UsageError(f"spatial size must be 2 or 3 positive multiples of {multiple}, got {tuple(spatial_size)}")
    return size


def image_transform(
    preset: IntensityPreset, spatial_size: Sequence[int], channels: int = 1, multiple: int = 4
) -> Compose:
    """Array pipeline for one (C, H, W) slice or (C, D, H, W) volume: channels, intensity preset, resize to the
    model's size, float32 tensor.

    The same pipeline is used for training and scoring, so a model sees exactly the mapping it was trained on.
    There are no flips here: a flipped scan is one of the OOD cases to detect; training flips (off by default)
    are drawn in the training step.
    """
    size = check_spatial_size(spatial_size, multiple)
    return Compose(
        [
            ToChannels(channels),
            preset.transform(),
            Resize(size, mode="bilinear" if len(size) == 2 else "trilinear", anti_aliasing=True),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


class ImageTransformd(MapTransform):
    """Dictionary wrapper of `image_transform`."""

    def __init__(
        self,
        keys: KeysCollection,
        preset: IntensityPreset,
        spatial_size: Sequence[int],
        channels: int = 1,
        multiple: int = 4,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pipeline = image_transform(preset, spatial_size, channels, multiple)

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.pipeline(d[key])
        return d
