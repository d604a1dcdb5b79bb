"""Synthetic anatomical phantoms written as DICOM series or NIfTI volumes, with optional corrupted copies.

A phantom is a CT-like axial stack built from ellipses (air, body, rib ring, spine, lungs, liver, vessels and
lesions) whose shapes vary smoothly along the slices and randomly per volume. In memory a volume is
`vol[k, row, col]` (slice k, rows and columns as displayed), float32 and integer-valued: Hounsfield units for CT,
arbitrary positive intensities for MR. Both formats store exactly these numbers: DICOM slice k has pixel array
`vol[k]`, NIfTI data satisfies `data[:, :, k] == vol[k].T`.

Corrupted copies apply one artifact of `artifacts.ARTIFACTS` at a `mild` or `strong` strength, mostly with MONAI
transforms, on the volume rescaled to [0, 1], and are mapped back to the units of the clean scan. The OOD sets add
every artifact at the `reject` strength (`artifacts.REJECT`), every orientation error (`geometry.ORIENTATIONS`), every
coverage error (`geometry.COVERAGE`) and the files of `wrong_modality`. The defect sets add one local defect per kind
(`defects.DEFECTS`), each with its mask as a uint8 NIfTI file in `masks/`.

pydicom, nibabel and MONAI are imported inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UsageError
from ..io import atomic_path, write_csv_atomic
from .artifacts import ARTIFACTS, REJECT, check_modality, corrupt_volume, to_stored
from .defects import DEFECTS, draw_defect
from .geometry import COVERAGE, ORIENTATIONS, cover, misorient

FORMATS = ("dicom", "nifti")
WRONG_MODALITY = "wrong_modality"  # the folder of the wrong-modality files of `make_phantoms(ood_sets=True)`
ANATOMIES = ("body", "brain")  # CT/MR body phantoms of ellipses; brain MR from the MNI152 template (`anatomy`)
MIN_SIZE = 16
MANIFEST_COLUMNS = (
    "path",
    "volume_id",
    "format",
    "modality",
    "artifact",
    "strength",
    "parameter",
    "n_slices",
    "size",
    "seed",
)
MASK_COLUMN = "mask"  # the defect's mask, relative to the manifest's folder: a manifest column with `defects`
MASKS = "masks"  # the folder of the defect masks of `make_phantoms(defects=True)`

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


def _integer_pixels(image: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    """`image` as little-endian `dtype`, refusing values that would not be stored exactly."""
    info = np.iinfo(dtype)
    if not np.array_equal(image, np.rint(image)) or image.min() < info.min or image.max() > info.max:
        raise ValueError(f"pixel values must be integers in [{info.min}, {info.max}] to be stored as {dtype.__name__}")
    return image.astype(np.dtype(dtype).newbyteorder("<"))


def write_dicom_series(
    volume: np.ndarray,
    folder: str | Path,
    *,
    modality: str,
    volume_index: int,
    spacing: float = 1.0,
    study_uid: Optional[str] = None,
    series_number: int = 1,
    description: str = "cdm-ood phantom",
) -> str:
    """Write `volume` as a series of single-frame DICOM files `folder/slice_000.dcm`, ...; returns its
    SeriesInstanceUID.

    CT is stored as signed int16 HU (slope 1, intercept 0), MR as uint16. Pass the same `study_uid` to put
    several series in one study (one is generated otherwise). The patient is the fake "PHANTOM^<volume_index>".
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        generate_uid,
    )

    check_modality(modality)
    pixels = _integer_pixels(volume, np.int16 if modality == "ct" else np.uint16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])  # shared by the study's series
    series_uid = generate_uid()
    sop_class = CTImageStorage if modality == "ct" else MRImageStorage
    width = max(3, len(str(len(pixels) - 1)))
    for k, image in enumerate(pixels):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Modality = modality.upper()
        ds.Manufacturer = "cdm-ood"
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.PatientName = f"PHANTOM^{volume_index}"
        ds.PatientID = f"PHANTOM-{volume_index}"
        ds.PatientBirthDate = ""
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = spacing
        ds.SliceLocation = k * spacing
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        if modality == "ct":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.KVP = ""
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
            ds.ScanOptions = ds.EchoTime = ds.EchoTrainLength = ""
        ds.PixelData = image.tobytes()
        with atomic_path(folder / f"slice_{k:0{width}d}.dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return series_uid


def write_nifti(
    volume: np.ndarray,
    path: str | Path,
    *,
    spacing: float = 1.0,
    affine: Optional[np.ndarray] = None,
    dtype: type[np.generic] = np.float32,
) -> None:
    """Write `volume` to a gzipped NIfTI-1 file as `dtype` (float32 by default) `data = vol.transpose(2, 1, 0)`
    with `affine` (voxel -> RAS mm; by default diag(spacing, spacing, spacing, 1)). The gzip header carries no
    timestamp, so equal volumes give equal files."""
    import nibabel as nib

    affine = np.diag([spacing, spacing, spacing, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(volume, dtype=dtype).transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))


def _prepare_out(out: Path) -> None:
    """Create `out`, refusing an existing file or non-empty folder so that nothing is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; refusing to write phantoms into it")
    out.mkdir(parents=True, exist_ok=True)


def _variants(corrupt: bool, ood_sets: bool = False, defects: bool = False) -> list[tuple[str, str]]:
    """(artifact, strength) pairs written per volume, the clean one first: with `corrupt` every artifact of
    `ARTIFACTS` at its strengths, with `ood_sets` every artifact at the reject strength and every orientation and
    coverage error (strength ""), with `defects` every local defect of `DEFECTS` (strength "")."""
    pairs = [("none", "none")]
    if corrupt:
        pairs += [(artifact, strength) for artifact, strengths in ARTIFACTS.items() for strength in strengths]
    if ood_sets:
        pairs += [(artifact, "reject") for artifact in REJECT] + [(error, "") for error in (*ORIENTATIONS, *COVERAGE)]
    if defects:
        pairs += [(kind, "") for kind in DEFECTS]
    return pairs


def variant(clean: np.ndarray, artifact: str, strength: str, seed: int, modality: str) -> tuple[np.ndarray, object]:
    """The copy of a clean volume that a `_variants` pair names and its parameter ("" for none): the clean
    volume, a corrupted copy (`artifacts.corrupt_volume`), a misoriented one (`geometry.misorient`) or one with a
    coverage error (`geometry.cover`)."""
    if artifact == "none":
        return clean, ""
    if artifact in ORIENTATIONS:
        return misorient(clean, artifact), ""
    if artifact in COVERAGE:
        return cover(clean, artifact, seed), ""
    return corrupt_volume(clean, artifact, strength, seed, modality)


def _write_mask(mask: np.ndarray, out: Path, name: str, affine: Optional[np.ndarray]) -> str:
    """Write a defect's mask as uint8 NIfTI `masks/<name>_mask.nii.gz` under `out` with the volume's affine (for a
    DICOM series, `affine` is that of its slice geometry); returns the path relative to `out`."""
    rel = f"{MASKS}/{name}_mask.nii.gz"
    write_nifti(mask, out / rel, affine=affine, dtype=np.uint8)
    return rel


def _phantom_series_affine() -> np.ndarray:
    """The RAS affine of the voxels `vol[k].T` of a series of `write_dicom_series` at its default spacing."""
    from .orientation import series_affine

    return series_affine((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0), (0.0, 0.0, 1.0))


def _corruption_seed(seed: int, volume_index: int) -> int:
    """Seed of the random artifacts of one volume, independent of how many volumes are made."""
    return int(np.random.SeedSequence([seed, volume_index]).generate_state(1)[0])


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _generator(
    anatomy: str, size: int, slices: int, modality: str
) -> tuple[Callable[[np.random.Generator], np.ndarray], Optional[np.ndarray]]:
    """The clean volume drawn from an rng for `anatomy`, and the NIfTI affine of its grid (None: the default)."""
    if anatomy == "body":
        return lambda rng: phantom_volume(rng, size, slices, modality), None
    from .anatomy import brain_affine, brain_volume, template_folder

    template_folder()  # a missing `anatomy` extra is reported before anything is written
    return lambda rng: brain_volume(rng, size, slices), brain_affine(size, slices)


def make_phantoms(
    out: str | Path,
    n: int,
    fmt: str,
    size: int = 64,
    slices: int = 16,
    modality: Optional[str] = None,
    seed: int = 0,
    corrupt: bool = False,
    progress: Optional[Callable[[int, int, str], None]] = None,
    ood_sets: bool = False,
    anatomy: str = "body",
    defects: bool = False,
) -> Path:
    """Write `n` phantoms (and with `corrupt` their 12 corrupted copies each) into the new or empty folder `out`,
    plus `out/manifest.csv`, and return the manifest's path.

    `fmt` is "dicom" (a series folder per volume) or "nifti" (one .nii.gz per volume). `anatomy` "body" gives
    the ellipse phantoms (`modality` "ct" by default, or "mr"); "brain" gives MR subjects of the MNI152 template
    (`anatomy.brain_volume`, NIfTI only, needs `cdm-ood[anatomy]`). With `ood_sets`, each volume also gets a copy
    per artifact at the reject strength and per orientation and coverage error (`geometry`), and
    `out/wrong_modality/` the files of `wrong_modality.wrong_modality_files`, all listed in the manifest. With
    `defects`, each volume also gets a copy per local defect (`defects.draw_defect`) and its mask
    `masks/<name>_mask.nii.gz` (uint8, the volume's geometry), named in the manifest's extra `mask` column.
    `progress(done, total, path)` is called after each volume is written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {FORMATS}, got {fmt!r}")
    if anatomy not in ANATOMIES:
        raise UsageError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    modality = modality or ("mr" if anatomy == "brain" else "ct")
    check_modality(modality)
    if anatomy == "brain" and (fmt, modality) != ("nifti", "mr"):
        raise UsageError(f"brain subjects are MR volumes written as NIfTI, got format {fmt!r}, modality {modality!r}")
    if n < 1 or seed < 0:
        raise ValueError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    draw, affine = _generator(anatomy, size, slices, modality)
    out = Path(out)
    _prepare_out(out)
    rng = np.random.default_rng(seed)
    variants = _variants(corrupt, ood_sets, defects)
    mask_affine = affine if fmt == "nifti" else _phantom_series_affine()
    total = n * len(variants)
    rows: list[dict[str, object]] = []
    for index in range(n):
        clean = draw(rng)
        study_uid = _new_uid() if fmt == "dicom" else None
        for series_number, (artifact, strength) in enumerate(variants, start=1):
            name = f"phantom_{index:04d}" + "".join(
                f"_{part}" for part in (artifact, strength) if part not in ("", "none")
            )
            if artifact in DEFECTS:
                (volume, mask), parameter = draw_defect(clean, artifact, _corruption_seed(seed, index), modality), ""
            else:
                volume, parameter = variant(clean, artifact, strength, _corruption_seed(seed, index), modality)
            if study_uid is None:
                rel = f"{name}.nii.gz"
                write_nifti(volume, out / rel, affine=affine)
                volume_id = rel
            else:
                rel = name
                label = "" if artifact == "none" else f", {artifact} {strength}".rstrip()
                volume_id = write_dicom_series(
                    volume,
                    out / rel,
                    modality=modality,
                    volume_index=index,
                    study_uid=study_uid,
                    series_number=series_number,
                    description=f"cdm-ood phantom{label}",
                )
            values = (rel, volume_id, fmt, modality, artifact, strength, parameter, len(volume), size, seed)
            rows.append(dict(zip(MANIFEST_COLUMNS, values, strict=True)))
            if artifact in DEFECTS:
                rows[-1][MASK_COLUMN] = _write_mask(mask, out, name, mask_affine)
            if progress is not None:
                progress(len(rows), total, rel)
    if ood_sets:
        from .wrong_modality import wrong_modality_files

        rows += wrong_modality_files(out / WRONG_MODALITY, modality, size, seed, slices)
    manifest = out / "manifest.csv"
    write_csv_atomic(manifest, (*MANIFEST_COLUMNS, MASK_COLUMN) if defects else MANIFEST_COLUMNS, rows)
    return manifest


def is_manifest(path: str | Path) -> bool:
    """True for a `make-phantoms` manifest: a .csv file whose header holds the manifest's columns."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return set(MANIFEST_COLUMNS) <= set(next(csv.reader(f), []))


def manifest_masks(path: str | Path) -> dict[Path, Path]:
    """The defect volumes of a `make-phantoms --defects` manifest and their masks (rows with a `mask`), paths
    relative to the manifest's folder."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {path.parent / row["path"]: path.parent / row[MASK_COLUMN] for row in rows if row.get(MASK_COLUMN)}


def read_mask(path: str | Path) -> np.ndarray:
    """A defect mask of `make_phantoms(defects=True)` as a boolean `mask[k, row, col]`: slice k lines up, pixel for
    pixel, with slice k that the readers give of its volume (a DICOM series or a NIfTI volume of `make_phantoms`),
    whatever the mask's affine says about world space."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0).astype(bool)


def manifest_sets(path: str | Path) -> dict[str, list[Path]]:
    """The volumes of a `make-phantoms` manifest by set: `clean`, `<artifact>-<strength>` for each corruption and
    `<artifact>` for each row without a strength (orientation errors, wrong-modality files); paths relative to the
    manifest's folder."""
    path = Path(path)
    sets: dict[str, list[Path]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            artifact, strength = row["artifact"], row["strength"]
            name = "clean" if artifact == "none" else f"{artifact}-{strength}" if strength else artifact
            sets.setdefault(name, []).append(path.parent / row["path"])
    return sets
