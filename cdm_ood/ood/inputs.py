"""What the Python API takes as images, read one image at a time: arrays and tensors, paths, MONAI dicts, slices
from the data layer, and any iterable of them.

Arrays follow the sklearn / pytorch-ood convention that the first axis counts images, except where it can only be
the channels:

| shape | images |
|---|---|
| (H, W) | one |
| (N, H, W) | N grey images; (C, H, W) with C the model's channel count is one image |
| (N, C, H, W) | N |

A (3, H, W) array for a 1-channel model could be one RGB image or three grey ones: it is refused, give (1, 3, H, W)
or (3, 1, H, W). A MONAI dict holds one channel-first image (C, H, W) or a batch (B, C, H, W) under its image key,
as MONAI transforms and DataLoaders make them. Paths (str or `os.PathLike`, files or folders) are read through
the data layer, which gives each slice its path, index, volume and header flags (`cdm_ood.data.headers`): a slice
whose header disagrees with itself is never scored, whichever way it is given.

A 3D model takes whole volumes instead: (D, H, W) and (C, D, H, W) arrays are one volume, (B, C, D, H, W) is B;
a MONAI dict holds one (C, D, H, W) volume or a batch (B, C, D, H, W); paths give the volumes that
`cdm_ood.data.volumes` stacks from the slices of each series or file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from ..data.records import Slice, SliceSource, Volume
from ..data.volumes import iter_inputs
from ..errors import UsageError

Inputs = Any  # an array or tensor, a path, a MONAI dict, a `Slice`, or an iterable of them (see the module doc)
Image = np.ndarray | Tensor
# One (C, H, W) image or (C, D, H, W) volume, where it was read from and its flags from the data layer (none for
# images given in memory: their pixels are checked when scored).
Item = tuple[Image, Optional[SliceSource], tuple[str, ...]]


def iter_images(inputs: Inputs, channels: int, image_key: str = "image", spatial_dims: int = 2) -> Iterator[Item]:
    """Every image of `inputs` in order, one (C, H, W) image (a (C, D, H, W) volume for `spatial_dims` 3) at a
    time, with its source when it was read from a file (None: from memory) and its flags (a `Slice`'s or `Volume`'s);
    a file that cannot be read raises its `DataError`."""
    if isinstance(inputs, (str, os.PathLike)):
        yield from ((s.image, s.source, s.flags) for s in iter_inputs(Path(inputs), spatial_dims))
    elif isinstance(inputs, (Slice, Volume)):
        yield inputs.image, inputs.source, inputs.flags
    elif isinstance(inputs, Mapping):
        image = inputs[image_key]
        one = _is_array(image) and image.ndim == spatial_dims + 1
        yield from iter_images(image[None] if one else image, channels, image_key, spatial_dims)
    elif _is_array(inputs):
        split = _split(inputs, channels) if spatial_dims == 2 else _split_volumes(inputs)
        yield from ((image, None, ()) for image in split)
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (bytes, bytearray)):
        for item in inputs:
            yield from iter_images(item, channels, image_key, spatial_dims)
    else:
        raise TypeError(f"cannot score a {type(inputs).__name__}: give arrays, tensors, paths or MONAI dicts")


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """`items` in lists of `size` (the last one shorter), so that a model sees full batches whatever the inputs'
    own grouping (one image per item, or batches of any size)."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, Tensor))


def _split(x: Image, channels: int) -> list[Image]:
    if x.ndim == 2:
        return [x[None]]
    if x.ndim == 3:
        if x.shape[0] == channels:
            return [x]
        if x.shape[0] == 3:
            raise UsageError(f"a (3, H, W) array for a {channels}-channel model is ambiguous: give one RGB image as "
                             "(1, 3, H, W) or three grey images as (3, 1, H, W)")  # fmt: skip
        return list(x[:, None])
    if x.ndim == 4:
        return list(x)
    raise UsageError(f"expected (H, W), (N, H, W), (C, H, W) or (N, C, H, W) images, got shape {tuple(x.shape)}")


def _split_volumes(x: Image) -> list[Image]:
    if x.ndim in (3, 4):
        return [x if x.ndim == 4 else x[None]]
    if x.ndim == 5:
        return list(x)
    raise UsageError(f"a 3D model takes volumes (D, H, W), (C, D, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
