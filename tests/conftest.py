"""Shared fixtures: a tiny trained and calibrated checkpoint, and a folder of real scans with bad files."""

import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Every command tracks its run in MLflow by default; tests of tracking say `--mlflow` (and one checks the default
# without this switch), the others keep their working directory free of MLflow stores.
os.environ.setdefault("CDM_OOD_MLFLOW", "false")
# Under pytest-xdist every worker and each process it starts runs torch on one thread: two workers with two threads
# each on two cores spin against each other. A script that asks for two threads anyway waits for them passively
# (OpenMP's busy wait made a benchmark run 5x slower beside another worker, 20x when forked from `processes.WARM`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from cdm_ood.data.artifacts import corrupt_volume
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.jobs.config import load_config
from cdm_ood.jobs.training import train
from cdm_ood.jobs.validation import calibrate_on_validation

CONFIG = Path(__file__).parent.parent / "configs" / "phantoms-ct.yaml"
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "MRN-998877", "PatientBirthDate": "19610203"}
# A tiny CT-phantom model of CONFIG (16x16, T=20), trained in seconds; add data.root and the train.* steps.
TINY_CT = [
    "data.phantoms={n: 10, size: 16, slices: 8}", "data.size=[16, 16]", "model.channels=[8, 16]",
    "model.attention_levels=[false, false]", "model.num_head_channels=8", "schedule.T=20", "train.batch_size=8",
    "train.threads=1", "optim.warmup_steps=5",
]  # fmt: skip


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny CT-phantom model, trained and calibrated by `train` (as `cdm-ood train` does). With
    `CDM_OOD_TEST_CACHE` set (the mutation run, `tools/mutants.py`, starts one pytest session per mutant), it is
    trained once into that folder and read from there by later sessions."""
    cache = os.environ.get("CDM_OOD_TEST_CACHE")
    root = Path(cache) / "ck" if cache else tmp_path_factory.mktemp("ck")
    if (root / "run" / "model.pt").is_file():
        return root / "run" / "model.pt"
    config = load_config(CONFIG, [f"data.root={root / 'phantoms'}", *TINY_CT, "train.steps=40", "train.val_every=40",
                                  "train.checkpoint_every=40"])  # fmt: skip
    return train(config, root / "run", finish=[calibrate_on_validation])


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> Path:
    """A folder like an incoming archive: a DICOM series with patient identifiers, clean and corrupted NIfTI
    volumes, a constant PNG slice, a truncated DICOM, an unknown binary (`junk.bin`, not an image) and a text
    sidecar (`notes.txt`, left out by the default ignore list)."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(7)
    clean = phantom_volume(rng, size=16, slices=4)
    write_dicom_series(clean, folder / "study" / "series1", modality="ct", volume_index=0)
    for path in sorted((folder / "study" / "series1").iterdir()):
        ds = pydicom.dcmread(path)
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.save_as(path)
    write_nifti(phantom_volume(rng, size=16, slices=4), folder / "clean.nii.gz")
    strong, _ = corrupt_volume(clean, "spike", "strong", 3, "ct")
    write_nifti(strong, folder / "spiked.nii.gz")
    from PIL import Image

    Image.fromarray(np.full((16, 16), 80, np.uint8)).save(folder / "blank.png")
    good = (folder / "study" / "series1" / "slice_000.dcm").read_bytes()
    (folder / "broken.dcm").write_bytes(good[: len(good) // 2])
    (folder / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "notes.txt").write_text("reading room notes\n")
    return folder
