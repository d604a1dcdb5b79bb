"""Brain-MR subjects made from the one real brain the nilearn wheel ships: the MNI152 2009a symmetric template.

nilearn (`pip install 'cdm-ood[anatomy]'`) carries, inside its package, the template's T1 image and its grey- and
white-matter probability maps at 1 mm (197 x 233 x 189, brain-extracted, RAS). They are read from the installed
package folder, never through a nilearn fetcher: nothing is downloaded.

A subject is the template moved into a scanner grid by a random smooth deformation (head size per axis, rotation,
position, and an elastic field interpolated from a coarse grid of displacements), then given a per-subject T1-like
contrast in the spirit of SynthSeg: intensities of CSF < grey < white matter drawn per subject and blended with the
template's own T1, a random gamma, a smooth multiplicative bias field and Rician noise. The grid is fixed by the
image size alone (`brain_affine`): `size` x `size` pixels over a `FOV_MM` square field of view and `slices` axial
slices over an `SLAB_MM` slab, RAS millimetres, so the head lies at a different place in every subject. Volumes
are `vol[k, row, col]` with `data[:, :, k] == vol[k].T` in RAS (columns go to the patient's right, rows to the
anterior), integer-valued MR intensities, as `phantoms.phantom_volume` gives them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CdmOodError, MissingExtraError
from .artifacts import to_stored
from .phantoms import MIN_SIZE

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MAPS = ("t1", "gm", "wm")  # the template files, in the channel order of `tissue_maps` (CSF is added last)
FOV_MM = 220.0  # in-plane field of view (square), millimetres
SLAB_MM = 150.0  # superior-inferior extent covered by the slices, millimetres
CENTRE_MM = (0.0, -18.0, 10.0)  # centre of the grid, in template (MNI) millimetres: the brain's middle
WARP_GRID = 5  # control points per axis of the elastic field
WARP_SD_MM = 2.0  # standard deviation of the elastic displacements
T1_WHITE = 222.0 / 255.0  # the template T1's mean in white matter (probability > 0.9): its white-matter level


@dataclass(frozen=True)
class Subject:
    """One subject's random draw: geometry (template -> scanner) and contrast."""

    scale: tuple[float, float, float]  # head size per axis (x, y, z)
    angles: tuple[float, float, float]  # rotations about x, y, z, radians
    shift: tuple[float, float, float]  # head position, millimetres
    warp: np.ndarray  # (3, WARP_GRID, WARP_GRID, WARP_GRID) elastic displacements, millimetres
    csf: float  # tissue intensities relative to white matter (1)
    grey: float
    blend: float  # weight of the template's own T1 against the tissue model
    gamma: float
    bias: np.ndarray  # (3, 3, 3) coarse log-gain of the bias field
    noise: float  # Rician noise sd, relative to white matter
    gain: float  # white-matter level in stored units
    noise_seed: int


def template_folder() -> Path:
    """The folder of the MNI152 files inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError as error:
        raise MissingExtraError("nilearn", "anatomy") from error
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in MAPS if not (folder / TEMPLATE.format(name)).is_file()]
    if missing:
        raise CdmOodError(
            f"nilearn {nilearn.__version__} does not ship the MNI152 2009a template ({', '.join(missing)}) in "
            f"{folder}; install a nilearn that does: pip install 'cdm-ood[anatomy]'"
        )
    return folder


@functools.lru_cache(maxsize=2)
def _template(pool: tuple[int, int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """T1, grey matter, white matter and brain mask as a (1, 4, X, Y, Z) tensor in [0, 1], averaged over blocks of
    `pool` voxels (no aliasing when sampled coarsely), and the voxel -> RAS mm affine of that grid."""
    import nibabel as nib

    folder = template_folder()
    images = [nib.load(folder / TEMPLATE.format(name)) for name in MAPS]
    data = np.stack([np.asarray(image.dataobj, dtype=np.float32) / 255.0 for image in images])
    maps = torch.from_numpy(np.concatenate([data, data[:1] > 0]).astype(np.float32))[None]
    pooled = F.avg_pool3d(maps, kernel_size=pool, stride=pool)
    block = np.diag([*pool, 1.0])
    block[:3, 3] = (np.asarray(pool) - 1) / 2.0
    return pooled, images[0].affine @ block


def brain_affine(size: int, slices: int) -> np.ndarray:
    """The voxel -> RAS mm affine of a subject volume of `slices` axial slices of `size` x `size` pixels."""
    spacing = np.array([FOV_MM / size, FOV_MM / size, SLAB_MM / slices])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(CENTRE_MM) - spacing * (np.array([size, size, slices]) - 1) / 2.0
    return affine


def draw_subject(rng: np.random.Generator) -> Subject:
    """A random subject: realistic ranges of head size, tilt, position, deformation and T1 contrast."""
    size = rng.uniform(0.9, 1.08)
    return Subject(
        scale=tuple(float(size * s) for s in rng.uniform(0.95, 1.05, 3)),
        angles=tuple(float(a) for a in np.deg2rad(rng.uniform(-1.0, 1.0, 3) * (10.0, 5.0, 5.0))),
        shift=tuple(float(s) for s in rng.uniform(-1.0, 1.0, 3) * (6.0, 6.0, 8.0)),
        warp=rng.normal(0.0, WARP_SD_MM, (3, WARP_GRID, WARP_GRID, WARP_GRID)),
        csf=float(rng.uniform(0.15, 0.35)),
        grey=float(rng.uniform(0.55, 0.75)),
        blend=float(rng.uniform(0.3, 0.8)),
        gamma=float(np.exp(rng.normal(0.0, 0.1))),
        bias=rng.normal(0.0, 0.04, (3, 3, 3)),
        noise=float(rng.uniform(0.005, 0.015)),
        gain=float(rng.uniform(900.0, 1400.0)),
        noise_seed=int(rng.integers(2**32)),
    )


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth(coarse: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """A coarse (C, a, b, c) grid interpolated (trilinear, corners aligned) to (C, *shape)."""
    grid = torch.from_numpy(np.asarray(coarse, dtype=np.float32))[None]
    return F.interpolate(grid, size=shape, mode="trilinear", align_corners=True)[0]


def tissue_maps(subject: Subject, size: int, slices: int) -> torch.Tensor:
    """The subject's (4, size, size, slices) maps on the grid of `brain_affine`: template T1, grey matter, white
    matter and CSF (the brain mask less grey and white matter), each in [0, 1]."""
    shape = (size, size, slices)
    affine = brain_affine(size, slices)
    pool = tuple(max(1, int(s)) for s in np.diag(affine)[:3])
    maps, template_affine = _template(pool)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    # scanner = centre + shift + R S (template - centre)  =>  template = centre + S^-1 R^T (scanner - centre - shift)
    centre = np.asarray(CENTRE_MM)
    inverse = np.diag(1.0 / np.asarray(subject.scale)) @ _rotation(subject.angles).T
    template_mm = centre + (world - centre - np.asarray(subject.shift)) @ inverse.T
    template_mm += _smooth(subject.warp, shape).permute(1, 2, 3, 0).double().numpy()
    voxel = template_mm @ np.linalg.inv(template_affine)[:3, :3].T + np.linalg.inv(template_affine)[:3, 3]
    extent = np.asarray(maps.shape[2:], dtype=np.float64) - 1.0
    normalised = 2.0 * voxel / extent - 1.0  # grid_sample: last axis (x, y, z) indexes the input's (W, H, D)
    grid = torch.from_numpy(normalised[..., ::-1].astype(np.float32).copy())[None]
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    t1, grey, white, brain = sampled
    csf = (brain - grey - white).clamp(0.0, 1.0)
    return torch.stack([t1, grey, white, csf])


def render(subject: Subject, maps: torch.Tensor) -> np.ndarray:
    """The subject's image `vol[k, row, col]` from its `tissue_maps`: T1-like contrast, gamma, bias field and
    Rician noise, in stored MR units (integer-valued float32)."""
    t1, grey, white, csf = maps.double().numpy()
    tissue = subject.csf * csf + subject.grey * grey + white
    image = subject.blend * t1 / T1_WHITE + (1.0 - subject.blend) * tissue
    image = np.clip(image, 0.0, None) ** subject.gamma
    image *= np.exp(_smooth(subject.bias[None], t1.shape)[0].double().numpy())
    noise = np.random.default_rng(subject.noise_seed).normal(0.0, subject.noise, (2, *image.shape))
    image = np.hypot(image + noise[0], noise[1])
    return to_stored(image.transpose(2, 1, 0) * subject.gain, "mr")


def brain_volume(rng: np.random.Generator, size: int = 64, slices: int = 24) -> np.ndarray:
    """A random brain-MR subject `vol[k, row, col]` drawn from `rng`, on the grid of `brain_affine(size, slices)`.

    Successive calls on one `numpy.random.default_rng(seed)` give the subjects of
    `make_phantoms(anatomy="brain", seed=seed)`.
    """
    if size < MIN_SIZE or slices < 1:
        raise ValueError(f"need size >= {MIN_SIZE} and slices >= 1, got size={size}, slices={slices}")
    subject = draw_subject(rng)
    return render(subject, tissue_maps(subject, size, slices))
