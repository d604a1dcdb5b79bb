"""Pictures people look at, written as PNG: sample grids (PIL) and plots (matplotlib, imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import atomic_path


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model-space images in [-1, 1] as uint8 [0, 255]; 3D volumes (B, C, D, H, W) show their middle slice."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def image_grid(images: torch.Tensor | np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] tiled into one (H', W') or (H', W', 3) uint8 picture."""
    x = to_uint8(images)
    b, c, h, w = x.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = np.zeros((c, rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    return grid[0] if c == 1 else grid[:3].transpose(1, 2, 0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
