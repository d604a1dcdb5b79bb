"""Known acquisition artifacts applied to a volume (MONAI transforms, k-space line mixing and a k-space ghosting
comb, resampling, intensity mapping errors) at the two strengths of `ARTIFACTS` and at the `REJECT` strength a
radiographer would reject, and the stored value range of each modality that corrupted copies keep."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

MODALITIES = ("ct", "mr")

# Stored value range per modality: 12-bit CT in HU, and 12-bit unsigned MR intensities.
VALUE_RANGE = {"ct": (-1024.0, 3071.0), "mr": (0.0, 4095.0)}

# artifact -> {strength: parameter}. Parameters act on the volume rescaled to [0, 1]:
#   gibbs: GibbsNoise alpha (fraction of k-space radius removed),
#   spike: amplitude of the k-space spike's stripe pattern, as a fraction of the intensity range,
#   bias: RandBiasField coefficient bound, coefficients drawn from (-p, p),
#   rician: RandRicianNoise standard deviation, as a fraction of the intensity range,
#   ghosting: factor on every GHOST_PERIOD-th phase-encoding line of k-space,
#   gamma: AdjustContrast gamma.
ARTIFACTS: dict[str, dict[str, float]] = {
    "gibbs": {"mild": 0.5, "strong": 0.75},
    "spike": {"mild": 0.04, "strong": 0.15},
    "bias": {"mild": 0.1, "strong": 0.3},
    "rician": {"mild": 0.02, "strong": 0.08},
    "ghosting": {"mild": 1.4, "strong": 2.5},
    "gamma": {"mild": 1.5, "strong": 2.5},
}
GHOST_PERIOD = 4

# artifact -> parameter at the "reject" strength: a third level beyond "strong", at which a radiographer sends the
# scan back. Every artifact of `ARTIFACTS` has one, and four more exist at this strength only (they are not part
# of the `make-phantoms --corrupt` demo set):
#   motion: rotation in degrees and translation in percent of the field of view of the moved copy, whose k-space
#           lines replace the clean volume's from MOTION_TIME on (TorchIO `RandomMotion`'s line mixing),
#   blur: down-sampling factor of each slice before it is resampled back to its size (low resolution),
#   rescale: factor on the intensities above the volume's minimum (a wrong rescale slope: a CT or MR stored with
#            the wrong scaling; clipped to the stored range like every copy),
#   window: width, as a fraction of the intensity range, of a display window centred on the volume's mean that is
#           baked into the stored values (clipped to the window, then stretched over the whole range: a scan
#           exported with its viewing window applied).
REJECT: dict[str, float] = {
    "gibbs": 0.9,
    "spike": 0.4,
    "bias": 0.6,
    "rician": 0.2,
    "ghosting": 5.0,
    "gamma": 4.0,
    "motion": 10.0,
    "blur": 4.0,
    "rescale": 2.0,
    "window": 0.25,
}
MOTION_TIME = 0.6  # fraction of the phase-encoding lines (in acquisition order, edge to edge) before the move


def check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise UsageError(f"modality must be one of {MODALITIES}, got {modality!r}")


def to_stored(volume: np.ndarray, modality: str) -> np.ndarray:
    """Round to integers and clip to the modality's stored value range, as float32."""
    return np.clip(np.rint(volume), *VALUE_RANGE[modality]).astype(np.float32)


def ghost_slices(image: np.ndarray, factor: float, period: int = GHOST_PERIOD) -> np.ndarray:
    """Motion-like ghosting of each 2D slice of `image` (..., rows, cols), with rows as phase-encoding direction.

    Every `period`-th phase-encoding line of the slice's k-space (starting at the centre line) is multiplied by
    `factor`. A comb of period n in k-space equals the mean of n copies of the image shifted by rows/n, so this
    gives the image times 1 + (factor - 1) / n plus (factor - 1) / n times its copies shifted by multiples of
    rows/n along the rows: the periodic ghosts of inconsistent, e.g. respiratory-modulated, phase encoding. The
    result is divided by 1 + (factor - 1) / n, so the image keeps its intensity and each ghost has the relative
    amplitude (factor - 1) / (n + factor - 1).
    """
    k = np.fft.fft2(image, axes=(-2, -1))
    k[..., ::period, :] *= factor
    return np.fft.ifft2(k, axes=(-2, -1)).real / (1.0 + (factor - 1.0) / period)


def _spike(unit: np.ndarray, amplitude: float) -> np.ndarray:
    """One k-space spike per slice, off the centre, whose stripe pattern has the given amplitude."""
    from monai.transforms import KSpaceSpikeNoise

    rows, cols = unit.shape[-2:]
    loc = (rows // 2 + max(1, rows // 8), cols // 2 + max(1, cols // 5))
    # An inverse FFT divides by rows * cols: a coefficient of magnitude amplitude * rows * cols gives stripes of
    # that amplitude.
    return KSpaceSpikeNoise(loc, k_intensity=float(np.log(amplitude * rows * cols)))(unit)


def moved_copy(unit: np.ndarray, degrees: float, shift: float) -> np.ndarray:
    """Each slice of `unit` (slices, rows, cols) rotated in-plane by `degrees` and shifted by the fraction `shift` of
    the field of view along rows and columns (bilinear, zero outside)."""
    import torch
    import torch.nn.functional as F

    angle = np.deg2rad(degrees)
    theta = torch.tensor(
        [[np.cos(angle), -np.sin(angle), 2 * shift], [np.sin(angle), np.cos(angle), 2 * shift]], dtype=torch.float32
    )
    x = torch.as_tensor(unit, dtype=torch.float32)[:, None]
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)[:, 0].numpy()


def motion_slices(unit: np.ndarray, degrees: float, seed: int, time: float = MOTION_TIME) -> np.ndarray:
    """Rigid motion during the acquisition of each slice of `unit` (slices, rows, cols), rows being the
    phase-encoding direction, as TorchIO `RandomMotion` mixes k-space lines: the lines are acquired from one edge of
    k-space to the other, those before `time` (a fraction of the lines) come from one copy and the rest from the
    other: the unmoved copy fills the first part for `time` above 0.5 and the second otherwise (TorchIO's rule, so at
    `MOTION_TIME` the centre line is unmoved). The moved copy is rotated by `degrees` and shifted by `degrees` percent
    of the field of view; `seed` draws the direction of the move."""
    import torch

    sign = np.random.default_rng(seed).choice([-1.0, 1.0], size=2)
    moved = moved_copy(unit, sign[0] * degrees, sign[1] * degrees / 100.0)
    k, k_moved = (
        torch.fft.fftshift(torch.fft.fft2(torch.as_tensor(v, dtype=torch.float64)), dim=(-2, -1)) for v in (unit, moved)
    )
    first, second = (k, k_moved) if time > 0.5 else (k_moved, k)
    cut = int(time * unit.shape[-2])
    mixed = torch.cat([first[..., :cut, :], second[..., cut:, :]], dim=-2)
    return torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real.numpy()


def low_resolution(unit: np.ndarray, factor: float) -> np.ndarray:
    """Each slice of `unit` (slices, rows, cols) down-sampled by `factor` (area averaging) and resampled back to its
    size (bilinear): a low-resolution or blurred acquisition."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(unit, dtype=torch.float32)[:, None]
    size = x.shape[-2:]
    small = F.interpolate(x, size=[max(1, round(n / factor)) for n in size], mode="area")
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _apply_artifact(unit: np.ndarray, artifact: str, parameter: float, seed: int) -> np.ndarray:
    """A known artifact applied to a volume (slices, rows, cols) in [0, 1]; 2D transforms act on each slice."""
    from monai.transforms import AdjustContrast, GibbsNoise, RandBiasField, RandRicianNoise
    from monai.utils import convert_to_numpy

    if artifact == "gibbs":
        out = GibbsNoise(alpha=parameter)(unit)
    elif artifact == "spike":
        out = _spike(unit, parameter)
    elif artifact == "bias":  # one smooth 3D multiplicative field over the whole volume
        field = RandBiasField(degree=3, coeff_range=(-parameter, parameter), prob=1.0).set_random_state(seed)
        out = field(unit[None])[0]
    elif artifact == "rician":
        noise = RandRicianNoise(prob=1.0, std=parameter, sample_std=False).set_random_state(seed)
        out = noise(unit)
    elif artifact == "ghosting":
        out = ghost_slices(unit, parameter)
    elif artifact == "motion":
        out = motion_slices(unit, parameter, seed)
    elif artifact == "blur":
        out = low_resolution(unit, parameter)
    elif artifact == "rescale":
        out = unit * parameter
    elif artifact == "window":
        out = np.clip((unit - unit.mean()) / parameter + 0.5, 0.0, 1.0)
    else:  # gamma
        out = AdjustContrast(gamma=parameter)(unit)
    return convert_to_numpy(out, dtype=np.float64)


def corrupt_volume(
    volume: np.ndarray, artifact: str, strength: str, seed: int, modality: str
) -> tuple[np.ndarray, float]:
    """A corrupted copy of `volume` (slices, rows, cols) and the artifact's numeric parameter (see `ARTIFACTS`;
    strength "reject": `REJECT`).

    The volume is rescaled to [0, 1] with its own min and max, corrupted, mapped back to the clean scan's units,
    rounded and clipped like a clean one. `seed` fixes the random artifacts (bias, rician, motion).
    """
    check_modality(modality)
    parameter = REJECT.get(artifact) if strength == "reject" else ARTIFACTS.get(artifact, {}).get(strength)
    if parameter is None:
        raise ValueError(f"unknown artifact/strength {artifact!r}/{strength!r}; known: {ARTIFACTS}, reject: {REJECT}")
    lo, hi = float(volume.min()), float(volume.max())
    span = hi - lo if hi > lo else 1.0
    unit = ((volume - lo) / span).astype(np.float32)
    corrupted = _apply_artifact(unit, artifact, parameter, seed)
    return to_stored(corrupted * span + lo, modality), parameter
