"""Local defects with known masks, for evaluating where an anomaly map points: a metal object with its streaks,
a small lesion, a foreign object and a local ghost, each drawn into a few neighbouring slices of a volume
`vol[k, row, col]` (the phantoms' layout, in the volume's own units: HU for CT, raw MR intensities).

Every defect lies inside the body (voxels above a quarter of the way from the volume's 1st to its 99.5th
percentile; the slice's centre in a volume without one) and covers a few percent of a slice at most; its size is
a fraction of the slice (`SIZES`) and its contrast a fraction of that percentile span (`CONTRAST`), so it is
plain to see at every image size. The mask is True exactly where the defect changed or set voxels; every other
voxel keeps its value. Pure numpy, and the same `seed` gives the same defect.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .artifacts import VALUE_RANGE, check_modality, to_stored

DEFECTS = ("metal-streak", "lesion", "foreign-object", "local-ghost")

# Sizes as fractions of the smaller side of a slice (with a floor in pixels, `_pixels`):
#   metal: radius of the metal point; streak: radius of the disk its streaks reach, fading to nothing there;
#   lesion: in-plane radius of the ellipsoid (its semi-axes vary by +-30%); edge: width of its soft edge;
#   object: outer radius of the ring or half-side of the rectangle; ghost: half-side of the ghost's window,
#   shift: how far the ghost lies from the region it copies, along the rows (the phase-encoding direction).
SIZES = {"metal": 0.02, "streak": 0.12, "lesion": 0.06, "edge": 0.03, "object": 0.05, "ghost": 0.07, "shift": 0.25}
# Contrasts as fractions of the volume's percentile span: streak amplitude next to the metal, lesion offset
# from the tissue around it, foreign object above the 99.5th percentile, and the ghost's faint copy.
CONTRAST = {"streak": 0.8, "lesion": 0.3, "object": 0.5, "ghost": 0.35}
SLICES = 3  # a defect spans this many neighbouring slices (fewer when the volume has fewer)


def draw_defect(volume: np.ndarray, kind: str, seed: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `volume` (D, H, W) with one local defect of `kind` (`DEFECTS`) and the boolean mask (D, H, W) of
    the voxels it changed. The corrupted voxels are rounded and clipped to the modality's stored range
    (`artifacts.to_stored`); the others are `volume`'s, as float32."""
    check_modality(modality)
    if kind not in DEFECTS:
        raise UsageError(f"defect must be one of {DEFECTS}, got {kind!r}")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or min(volume.shape[1:]) < 8:
        raise ValueError(f"need a volume (D, H, W) with slices of at least 8 x 8 pixels, got {volume.shape}")
    rng = np.random.default_rng(seed)
    lo, hi = (float(v) for v in np.percentile(volume, [1.0, 99.5]))
    span = hi - lo if hi > lo else float(np.ptp(VALUE_RANGE[modality])) / 4  # a flat volume: a quarter of the range
    body = volume > lo + 0.25 * span
    side = min(volume.shape[1:])
    first = max(0, int(rng.integers(0, volume.shape[0])) - SLICES // 2)
    zs = np.arange(first, min(volume.shape[0], first + SLICES))
    dz = zs - zs[len(zs) // 2]
    rows, cols = np.ogrid[: volume.shape[1], : volume.shape[2]]
    new = volume[zs].astype(np.float64)
    if kind == "local-ghost":
        mask = _ghost(volume[zs], new, body[zs], rng, side, lo, span)
    else:
        reach = _pixels(side, {"metal-streak": "streak", "lesion": "lesion", "foreign-object": "object"}[kind])
        cy, cx = _centre(body[zs[len(zs) // 2]], rng, reach + _pixels(side, "edge"))
        dy, dx = rows - cy, cols - cx
        if kind == "metal-streak":
            mask = _metal(new, dy, dx, dz, rng, side, span, modality, lo)
        elif kind == "lesion":
            radius, edge, sign = _pixels(side, "lesion"), _pixels(side, "edge"), rng.choice([-1.0, 1.0])
            mask = _lesion(new, dy, dx, dz, rng, radius, edge, sign * CONTRAST["lesion"] * span, volume[zs], body[zs])
        else:
            mask = _foreign_object(new, dy, dx, rng, _pixels(side, "object"), hi + CONTRAST["object"] * span, modality)
    out, full = volume.copy(), np.zeros(volume.shape, dtype=bool)
    full[zs] = mask
    out[zs] = np.where(mask, to_stored(new, modality), volume[zs])
    full &= out != volume
    return out, full


LOCAL_ANOMALIES = ("bright-lesion", "dark-lesion", "void", "foreign-object")
"""Local anomalies of a chosen size and contrast (`draw_local_anomaly`): lesions, which a QA gate may only map, and
a signal void with a bright rim and a foreign object, which it must stop (docs/ood.md, "Local anomalies")."""


def draw_local_anomaly(
    volume: np.ndarray, kind: str, radius: float, contrast: float, seed: int, modality: str
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `volume` (D, H, W) with one local anomaly of `kind` (`LOCAL_ANOMALIES`) of in-plane radius `radius`
    pixels and `contrast` (a fraction of the volume's 1st-to-99.5th percentile span) inside the body, over `SLICES`
    neighbouring slices around one whose body is at least half the largest slice's, and its mask, as `draw_defect`:
    a lesion brighter or darker than the tissue by the contrast (soft edge of a third of its radius), a void at the
    1st percentile in a rim the contrast above the 99.5th, a ring or rectangle the contrast above the 99.5th
    percentile."""
    check_modality(modality)
    if kind not in LOCAL_ANOMALIES:
        raise UsageError(f"local anomaly must be one of {LOCAL_ANOMALIES}, got {kind!r}")
    if not radius > 0 or not contrast > 0:
        raise ValueError(f"need radius > 0 and contrast > 0, got radius={radius}, contrast={contrast}")
    volume = np.asarray(volume, dtype=np.float32)
    rng = np.random.default_rng(seed)
    lo, hi = (float(v) for v in np.percentile(volume, [1.0, 99.5]))
    span = hi - lo if hi > lo else float(np.ptp(VALUE_RANGE[modality])) / 4
    body = volume > lo + 0.25 * span
    area = body.sum(axis=(1, 2))
    middle = int(rng.choice(np.flatnonzero(area >= area.max() / 2)))  # a slice well inside the anatomy
    zs = np.arange(max(0, middle - SLICES // 2), min(volume.shape[0], middle + SLICES // 2 + 1))
    dz = zs - middle
    rows, cols = np.ogrid[: volume.shape[1], : volume.shape[2]]
    cy, cx = _centre(body[middle], rng, int(np.ceil(radius)) + 1)
    dy, dx = rows - cy, cols - cx
    new = volume[zs].astype(np.float64)
    if kind in ("bright-lesion", "dark-lesion"):
        offset = (1.0 if kind == "bright-lesion" else -1.0) * contrast * span
        mask = _lesion(new, dy, dx, dz, rng, radius, max(1.0, radius / 3), offset, volume[zs], body[zs])
    elif kind == "void":
        mask = _void(new, dy, dx, dz, radius, hi + contrast * span, lo)
    else:
        mask = _foreign_object(new, dy, dx, rng, max(1, round(radius)), hi + contrast * span, modality)
    out, full = volume.copy(), np.zeros(volume.shape, dtype=bool)
    full[zs] = mask
    out[zs] = np.where(mask, to_stored(new, modality), volume[zs])
    full &= out != volume
    return out, full


def _pixels(side: int, size: str) -> int:
    """A size of `SIZES` in pixels for slices whose smaller side is `side`: at least 1 (radii) or 2 (reaches)."""
    return max(1 if size in ("metal", "edge") else 2, round(SIZES[size] * side))


def _centre(body: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    """A random pixel of the slice whose square of half-side `margin` around it lies in the body; the body's
    innermost pixels when none does, the slice's centre when the slice holds no body."""
    inside = _interior(body, margin)
    while not inside.any() and margin > 0:
        margin //= 2
        inside = _interior(body, margin)
    candidates = np.argwhere(inside) if inside.any() else np.array([[body.shape[0] // 2, body.shape[1] // 2]])
    cy, cx = candidates[rng.integers(len(candidates))]
    return int(cy), int(cx)


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose square of half-side `margin` lies inside the image and inside `mask` (an integral image)."""
    h, w = mask.shape
    total = np.zeros((h + 1, w + 1), dtype=np.int64)
    total[1:, 1:] = mask.cumsum(0).cumsum(1)
    out = np.zeros_like(mask)
    n = 2 * margin + 1
    if n > h or n > w:
        return out
    count = total[n:, n:] - total[:-n, n:] - total[n:, :-n] + total[:-n, :-n]
    out[margin : h - margin, margin : w - margin] = count == n * n
    return out


def _metal(new, dy, dx, dz, rng, side, span, modality, lo) -> np.ndarray:
    """A metal point (the top of the CT range; a signal void at the 1st percentile in MR) whose bright and dark
    streaks radiate from it and fade to nothing at the streak radius, weaker in the slices next to it."""
    reach, point = _pixels(side, "streak"), _pixels(side, "metal")
    radius, angle = np.hypot(dy, dx), np.arctan2(dy, dx)
    wave = np.cos(int(rng.integers(4, 8)) * angle + rng.uniform(0.0, 2 * np.pi))
    streaks = np.sign(wave) * np.abs(wave) ** 3 * np.clip(1.0 - radius / reach, 0.0, None)
    metal = VALUE_RANGE[modality][1] if modality == "ct" else lo
    for k, d in enumerate(dz):
        fade = 0.6 ** abs(d)
        new[k] += CONTRAST["streak"] * span * fade * streaks
        new[k][radius <= point] = metal
    return np.broadcast_to(radius < reach, new.shape).copy()


def _lesion(new, dy, dx, dz, rng, radius, edge, offset, old, body) -> np.ndarray:
    """An ellipsoid of in-plane radius about `radius` pixels (semi-axes +-30%) whose intensity differs from the
    tissue around it by `offset`, with a soft edge of `edge` pixels; the tissue's texture shows through it."""
    ry, rx = radius * rng.uniform(0.7, 1.3, size=2)
    rz = max(1.0, len(dz) / 2)
    shell = 1.0 + edge / radius
    for k, d in enumerate(dz):
        r = np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2 + (d / rz) ** 2)
        weight = np.clip((shell - r) / (shell - 1.0), 0.0, 1.0)  # 1 inside, a linear ramp over the edge
        weight = weight * weight * (3.0 - 2.0 * weight)  # smoothstep
        new[k] += offset * weight
        new[k][~body[k]] = old[k][~body[k]]
    return (new != old) & body


def _void(new, dy, dx, dz, radius, rim_value, void_value) -> np.ndarray:
    """A signal void (a metal implant in MR) of `radius` pixels, largest in the middle slice and smaller by a
    pixel per slice away from it, inside a bright rim one pixel wide (the susceptibility fringe)."""
    distance = np.hypot(dy, dx)
    masks = []
    for k, d in enumerate(dz):
        r = max(1.0, radius - abs(d))
        new[k][distance <= r + 1] = rim_value
        new[k][distance <= r] = void_value
        masks.append(distance <= r + 1)
    return np.stack(masks)


def _foreign_object(new, dy, dx, rng, outer, value, modality) -> np.ndarray:
    """A small ring or filled rectangle (a clip, a marker) of outer radius or half-side `outer` pixels, at `value`
    (clipped to the modality's range)."""
    if rng.uniform() < 0.5:
        radius = np.hypot(dy, dx)
        shape = (radius <= outer) & (radius >= outer - max(1, outer // 2))
    else:
        half = np.maximum(1, np.rint(outer * rng.uniform(0.5, 1.0, size=2)))
        shape = (np.abs(dy) <= half[0]) & (np.abs(dx) <= half[1])
    value = min(value, VALUE_RANGE[modality][1])
    mask = np.broadcast_to(shape, new.shape).copy()
    new[mask] = value
    return mask


def _ghost(old, new, body, rng, side, lo, span) -> np.ndarray:
    """A faint copy of a square region of the body, shifted along the rows, added inside a window of that
    size: the copy is the region above the 1st percentile (the background) times the ghost contrast."""
    half, height = _pixels(side, "ghost"), old.shape[1]
    shift = max(2 * half + 1, _pixels(side, "shift"))
    centre = _centre(body[len(body) // 2], rng, half)
    sy, sx = (int(np.clip(c, half, n - half - 1)) for c, n in zip(centre, old.shape[1:], strict=True))
    ty = sy + shift if sy + shift + half < height else sy - shift
    ty = int(np.clip(ty, half, height - half - 1))
    source = (slice(None), slice(sy - half, sy + half + 1), slice(sx - half, sx + half + 1))
    target = (slice(None), slice(ty - half, ty + half + 1), slice(sx - half, sx + half + 1))
    ghost = CONTRAST["ghost"] * (old[source] - lo)
    new[target] += ghost
    mask = np.zeros(new.shape, dtype=bool)
    mask[target] = np.abs(ghost) >= 0.5
    return mask
