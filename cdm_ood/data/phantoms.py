"""Synthetic anatomical phantoms: CT-like or MR-like axial stacks built from ellipses.

A phantom is an axial stack of ellipses (air, body, rib ring, spine, lungs, liver, vessels and lesions) whose shapes
vary smoothly along the slices and randomly per volume. In memory a volume is `vol[k, row, col]` (slice k, rows and
columns as displayed), float32 and integer-valued: Hounsfield units for CT, arbitrary positive intensities for MR.
`data.volume_files` stores exactly these numbers as DICOM or NIfTI; `data.phantom_sets` writes whole sets of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .artifacts import check_modality, to_stored

MIN_SIZE = 16

# Tissue intensities per modality: (mean, per-volume jitter sd). Painted in the order of the shapes.
TISSUES = {
    "ct": {
        "air": (-1000.0, 0.0),
        "soft": (40.0, 8.0),
        "bone": (700.0, 80.0),
        "lung": (-850.0, 25.0),
        "liver": (60.0, 8.0),
        "vessel": (180.0, 30.0),
        "lesion": (100.0, 20.0),
    },
    "mr": {
        "air": (0.0, 0.0),
        "soft": (350.0, 30.0),
        "bone": (120.0, 20.0),
        "lung": (40.0, 10.0),
        "liver": (550.0, 40.0),
        "vessel": (850.0, 50.0),
        "lesion": (950.0, 40.0),
    },
}
NOISE_SD = {"ct": (3.0, 6.0), "mr": (5.0, 12.0)}  # range of the per-volume Gaussian texture noise sd
RING = (0.87, 0.95)  # inner and outer radius of the rib ring, in body radii


@dataclass(frozen=True)
class _Shape:
    """An ellipse in body coordinates (body radius 1) whose radii follow a sinusoidal profile along the slices.

    `z0`/`half_height` give a spherical extent in z (lesions); `hole` > 0 makes an annulus of that inner radius.
    """

    tissue: str
    cu: float
    cv: float
    ru: float
    rv: float
    amp: float = 0.0
    freq: float = 0.0
    phase: float = 0.0
    z0: Optional[float] = None
    half_height: float = 1.0
    hole: float = 0.0

    def scale(self, z: float) -> float:
        """Radius factor at relative slice position z in [0, 1] (0 where a lesion is absent)."""
        factor = 1.0 + self.amp * np.sin(2 * np.pi * self.freq * z + self.phase)
        if self.z0 is not None:
            factor *= np.sqrt(max(0.0, 1.0 - ((z - self.z0) / self.half_height) ** 2))
        return float(factor)

    def mask(self, u: np.ndarray, v: np.ndarray, z: float) -> np.ndarray:
        """Pixels inside the shape at slice position z."""
        s = self.scale(z)
        if s <= 0:
            return np.zeros(u.shape, dtype=bool)
        r2 = ((u - self.cu) / (self.ru * s)) ** 2 + ((v - self.cv) / (self.rv * s)) ** 2
        return (r2 <= 1.0) & (r2 >= self.hole**2)


@dataclass(frozen=True)
class _Anatomy:
    """One phantom's geometry: body centre, rotation and radii in the image (half-widths of 1), the body's radius
    profile along the slices (it is the unit disk in body coordinates), and the shapes painted inside it."""

    cx: float
    cy: float
    angle: float
    rx: float
    ry: float
    body: _Shape
    organs: tuple[_Shape, ...]


def _profile(rng: np.random.Generator, max_amp: float) -> dict[str, float]:
    """Random sinusoidal radius profile along the slices."""
    return {"amp": rng.uniform(0.0, max_amp), "freq": rng.uniform(0.3, 1.2), "phase": rng.uniform(0.0, 2 * np.pi)}


def _in_disk(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A uniform random point in a disk of `radius` around the body centre."""
    r, t = radius * np.sqrt(rng.uniform()), rng.uniform(0.0, 2 * np.pi)
    return float(r * np.cos(t)), float(r * np.sin(t))


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Random geometry of one phantom (independent of image size, so sizes share anatomy for a seed)."""
    cx, cy, angle = rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), rng.uniform(-0.2, 0.2)
    rx, ry = rng.uniform(0.78, 0.9), rng.uniform(0.55, 0.7)
    body = _Shape("soft", 0.0, 0.0, 1.0, 1.0, **_profile(rng, 0.08))
    lung_u, lung_v = rng.uniform(0.38, 0.46), rng.uniform(-0.18, -0.05)
    lung_ru, lung_rv = rng.uniform(0.26, 0.33), rng.uniform(0.36, 0.46)
    organs = [
        _Shape(
            "liver",
            -rng.uniform(0.25, 0.4),
            rng.uniform(0.1, 0.3),
            rng.uniform(0.3, 0.4),
            rng.uniform(0.25, 0.35),
            **_profile(rng, 0.15),
        ),
        _Shape("lung", -lung_u, lung_v, lung_ru, lung_rv, **_profile(rng, 0.1)),
        _Shape("lung", lung_u, lung_v, lung_ru, lung_rv, **_profile(rng, 0.1)),
        _Shape("vessel", rng.uniform(0.05, 0.15), rng.uniform(0.4, 0.5), 0.07, 0.07),  # aorta
    ]
    for _ in range(rng.integers(2, 4)):
        r = rng.uniform(0.03, 0.06)
        organs.append(_Shape("vessel", *_in_disk(rng, 0.6), r, r))
    for _ in range(rng.integers(2, 4)):
        r = rng.uniform(0.05, 0.1)
        z0, half_height = rng.uniform(0.0, 1.0), rng.uniform(0.2, 0.5)
        organs.append(_Shape("lesion", *_in_disk(rng, 0.6), r, r, z0=z0, half_height=half_height))
    organs.append(_Shape("bone", 0.0, 0.0, RING[1], RING[1], hole=RING[0] / RING[1]))
    organs.append(_Shape("bone", 0.0, rng.uniform(0.62, 0.72), rng.uniform(0.1, 0.14), rng.uniform(0.1, 0.13)))  # spine
    return _Anatomy(cx, cy, angle, rx, ry, body, tuple(organs))


def _draw_intensities(rng: np.random.Generator, modality: str) -> dict[str, float]:
    """Per-volume tissue intensities, jittered around the modality's means."""
    return {tissue: rng.normal(mean, sd) for tissue, (mean, sd) in TISSUES[modality].items()}


def _paint_slice(anatomy: _Anatomy, values: dict[str, float], size: int, z: float) -> np.ndarray:
    """One noiseless axial slice at relative position z: body coordinates per pixel, then shapes in order."""
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")  # rows go down (posterior), columns go right
    cos, sin = np.cos(anatomy.angle), np.sin(anatomy.angle)
    dx, dy = x - anatomy.cx, y - anatomy.cy
    body_scale = anatomy.body.scale(z)
    u = (cos * dx + sin * dy) / (anatomy.rx * body_scale)
    v = (-sin * dx + cos * dy) / (anatomy.ry * body_scale)
    image = np.full((size, size), values["air"])
    inside = u**2 + v**2 <= 1.0
    image[inside] = values["soft"]
    within_ring = u**2 + v**2 < RING[0] ** 2
    for shape in anatomy.organs:
        mask = shape.mask(u, v, z)
        if shape.tissue != "bone":
            mask &= within_ring
        image[mask] = values[shape.tissue]
    return image


def phantom_volume(rng: np.random.Generator, size: int = 64, slices: int = 16, modality: str = "ct") -> np.ndarray:
    """A random phantom volume `vol[k, row, col]`, float32, integer-valued (HU for CT), drawn from `rng`.

    Successive calls on one `numpy.random.default_rng(seed)` give the volumes of `make_phantoms(seed=seed)`.
    """
    check_modality(modality)
    if size < MIN_SIZE or slices < 1:
        raise ValueError(f"need size >= {MIN_SIZE} and slices >= 1, got size={size}, slices={slices}")
    anatomy = _draw_anatomy(rng)
    values = _draw_intensities(rng, modality)
    noise_sd = rng.uniform(*NOISE_SD[modality])
    zs = np.linspace(0.0, 1.0, slices) if slices > 1 else np.zeros(1)
    volume = np.stack([_paint_slice(anatomy, values, size, float(z)) for z in zs])
    volume += rng.normal(0.0, noise_sd, volume.shape)
    return to_stored(volume, modality)
