"""Sets of synthetic volumes written as DICOM series or NIfTI volumes, with optional corrupted copies, and their
manifest (`data.manifest`): the `cdm-ood make-phantoms` job.

The volumes are ellipse phantoms (`data.phantoms`) or brain-MR subjects (`data.anatomy`). Corrupted copies apply one
artifact of `artifacts.ARTIFACTS` at a `mild` or `strong` strength, mostly with MONAI transforms, on the volume
rescaled to [0, 1], and are mapped back to the units of the clean scan. The OOD sets add every artifact at the
`reject` strength (`artifacts.REJECT`), every orientation error (`geometry.ORIENTATIONS`), every coverage error
(`geometry.COVERAGE`) and the files of `wrong_modality`. The defect sets add one local defect per kind
(`defects.DEFECTS`), each with its mask as a uint8 NIfTI file in `masks/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UsageError
from ..utils.io import write_csv_atomic
from .anatomy import brain_affine, brain_volume, template_folder
from .artifacts import ARTIFACTS, REJECT, check_modality, corrupt_volume
from .defects import DEFECTS, draw_defect
from .formats.dicom import series_affine
from .geometry import COVERAGE, ORIENTATIONS, cover, misorient
from .manifest import MANIFEST_COLUMNS, MASK_COLUMN
from .phantoms import phantom_volume
from .volume_files import write_dicom_series, write_nifti
from .wrong_modality import wrong_modality_files

FORMATS = ("dicom", "nifti")
WRONG_MODALITY = "wrong_modality"  # the folder of the wrong-modality files of `make_phantoms(ood_sets=True)`
ANATOMIES = ("body", "brain")  # CT/MR body phantoms of ellipses; brain MR from the MNI152 template (`anatomy`)
MASKS = "masks"  # the folder of the defect masks of `make_phantoms(defects=True)`


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
        raise UsageError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
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
        rows += wrong_modality_files(out / WRONG_MODALITY, modality, size, seed, slices)
    manifest = out / "manifest.csv"
    write_csv_atomic(manifest, (*MANIFEST_COLUMNS, MASK_COLUMN) if defects else MANIFEST_COLUMNS, rows)
    return manifest
