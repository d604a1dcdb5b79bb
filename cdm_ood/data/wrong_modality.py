"""Images of the wrong modality or body part, for the OOD sets: real slices bundled inside the installed pydicom
wheel (no download) and synthetic ones made here.

Bundled (`pydicom/data/test_files`; the pydicom README there states no restriction on their use): CT_small.dcm
(CT, NEMA WG04), MR_small.dcm (MR, NEMA WG04), examples_overlay.dcm (abdominal MR), examples_rgb_color.dcm and
examples_palette.dcm (ultrasound, RGB and palette colour), dicomdirtests/77654033/CR1/6154 (a 16x16 cervical-spine
computed radiograph). A file this pydicom version does not ship is left out.

Synthetic: a phantom volume of the other modality (a CT phantom for an MR model, an MR phantom for a CT model),
a chest-radiograph-like PNG (the attenuation of a CT phantom projected along the anterior-posterior axis) and a
natural photograph as PNG (scikit-learn's bundled sample image china.jpg, CC BY 2.0, danielbuechele on Flickr, as
its README in sklearn/datasets/images states).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..utils.io import atomic_path
from .artifacts import MODALITIES, check_modality
from .manifest import MANIFEST_COLUMNS
from .phantoms import phantom_volume
from .volume_files import write_nifti

# name in the OOD folder -> (path inside pydicom/data/test_files, modality and body part)
BUNDLED = {
    "pydicom_ct_small.dcm": ("CT_small.dcm", "CT"),
    "pydicom_mr_small.dcm": ("MR_small.dcm", "MR"),
    "pydicom_mr_abdomen.dcm": ("examples_overlay.dcm", "MR abdomen"),
    "pydicom_us_rgb.dcm": ("examples_rgb_color.dcm", "US"),
    "pydicom_us_palette.dcm": ("examples_palette.dcm", "US"),
    "pydicom_cr_cspine.dcm": ("dicomdirtests/77654033/CR1/6154", "CR cervical spine"),
}
MU_WATER = 0.02  # linear attenuation of water per millimetre (about 60 keV), for the radiograph projection


def pydicom_test_files() -> Path:
    """The folder of test files inside the installed pydicom package."""
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def radiograph(ct_volume: np.ndarray, spacing: float = 1.0) -> np.ndarray:
    """A radiograph-like uint8 image (slices, cols) of a CT volume `vol[k, row, col]` in HU: the attenuation summed
    along the rows (anterior-posterior), shown as 1 - transmitted fraction (bone and soft tissue bright, lungs
    dark), the top slice at the top."""
    mu = np.clip(ct_volume + 1000.0, 0.0, None) / 1000.0 * MU_WATER
    image = 1.0 - np.exp(-mu.sum(axis=1) * spacing)
    image = image[::-1]  # superior (the last slice) at the top
    span = image.max() - image.min()
    return np.round((image - image.min()) / (span if span > 0 else 1.0) * 255).astype(np.uint8)


def natural_image(size: int = 256) -> np.ndarray:
    """The centre `size` x `size` crop of scikit-learn's bundled sample photograph (RGB, uint8)."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")
    top, left = (max(0, (n - size) // 2) for n in photo.shape[:2])
    return np.ascontiguousarray(photo[top : top + size, left : left + size])


def wrong_modality_files(
    out: str | Path, modality: str = "ct", size: int = 64, seed: int = 0, slices: int = 16
) -> list[dict]:
    """Write the wrong-modality files for a `modality` model into the new folder `out` (synthetic ones of `size`
    pixels, the other-modality phantom with `slices` slices); returns their manifest rows
    (`manifest.MANIFEST_COLUMNS`, artifact `wrong-modality`, paths relative to `out`'s parent)."""
    from ..utils.figures import save_png

    check_modality(modality)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    rows = []

    def row(name: str, fmt: str, kind: str, slices: object = "", width: object = "") -> None:
        rel = f"{out.name}/{name}"
        values = (rel, rel, fmt, kind, "wrong-modality", "", "", slices, width, seed)
        rows.append(dict(zip(MANIFEST_COLUMNS, values, strict=True)))

    source = pydicom_test_files()
    for name, (bundled, kind) in BUNDLED.items():
        if (source / bundled).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(source / bundled, tmp)
            row(name, "dicom", kind)
    rng = np.random.default_rng(seed)
    (other,) = (m for m in MODALITIES if m != modality)
    write_nifti(phantom_volume(rng, size, slices, other), out / f"phantom_{other}.nii.gz")
    row(f"phantom_{other}.nii.gz", "nifti", f"{other} phantom", slices, size)
    save_png(radiograph(phantom_volume(rng, size, size, "ct")), out / "radiograph.png")
    row("radiograph.png", "png", "radiograph-like projection", 1, size)
    save_png(natural_image(), out / "natural.png")
    row("natural.png", "png", "natural photograph", 1, 256)
    return rows
