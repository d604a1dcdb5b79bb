"""Brain-MR subjects of the MNI152 template (`cdm_ood.data.anatomy`, `make-phantoms --anatomy brain`): real NIfTI
files with RAS affines, deterministic from the seed, brain-like contrast, and the `anatomy` extra's message."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from processes import cdm, without_modules

from cdm_ood.data.anatomy import brain_affine, brain_volume, draw_subject, render, tissue_maps
from cdm_ood.data.manifest import MANIFEST_COLUMNS
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.errors import UsageError
from cdm_ood.jobs.config import ConfigError, load_config
from cdm_ood.jobs.training import train
from cdm_ood.model.checkpoint import load_model

SIZE, SLICES = 32, 12


def volume_of(path: Path) -> np.ndarray:
    """The file's data as `vol[k, row, col]`, read back with nibabel."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brain") / "subjects"
    make_phantoms(out, 2, "nifti", size=SIZE, slices=SLICES, seed=5, anatomy="brain")
    return out


def test_subjects_are_nifti_on_a_ras_millimetre_grid_with_a_manifest(subjects):
    with (subjects / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert [(r["path"], r["format"], r["modality"], r["artifact"]) for r in rows] == [
        (f"phantom_000{i}.nii.gz", "nifti", "mr", "none") for i in range(2)
    ]
    assert {(r["n_slices"], r["size"], r["seed"]) for r in rows} == {(str(SLICES), str(SIZE), "5")}
    for row in rows:
        image = nib.load(subjects / row["path"])
        assert image.shape == (SIZE, SIZE, SLICES)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.header.get_zooms(), (220 / SIZE, 220 / SIZE, 150 / SLICES), rtol=1e-6)
        np.testing.assert_allclose(image.affine, brain_affine(SIZE, SLICES), atol=1e-5)
        centre = image.affine @ np.array([(SIZE - 1) / 2, (SIZE - 1) / 2, (SLICES - 1) / 2, 1.0])
        assert np.abs(centre[:3] - (0.0, -18.0, 10.0)).max() < 1e-4, "the grid is centred on the brain in mm"
    first, second = (volume_of(subjects / r["path"]) for r in rows)
    assert np.corrcoef(first.ravel(), second.ravel())[0, 1] < 0.99, "two subjects differ"


def test_same_seed_same_bytes_and_another_seed_other_subjects(subjects, tmp_path):
    again = tmp_path / "again"
    make_phantoms(again, 2, "nifti", size=SIZE, slices=SLICES, seed=5, anatomy="brain")
    for name in ("phantom_0000.nii.gz", "phantom_0001.nii.gz", "manifest.csv"):
        assert (again / name).read_bytes() == (subjects / name).read_bytes(), name
    other = brain_volume(np.random.default_rng(6), SIZE, SLICES)
    assert not np.array_equal(other, volume_of(subjects / "phantom_0000.nii.gz"))
    np.testing.assert_array_equal(brain_volume(np.random.default_rng(5), SIZE, SLICES),
                                  volume_of(subjects / "phantom_0000.nii.gz"))  # fmt: skip


def test_t1_like_contrast_white_over_grey_over_csf_over_background():
    for seed in range(3):
        subject = draw_subject(np.random.default_rng(seed))
        maps = tissue_maps(subject, SIZE, SLICES).numpy().transpose(0, 3, 2, 1)  # as vol[k, row, col]
        volume = render(subject, tissue_maps(subject, SIZE, SLICES))
        _, grey, white, csf = maps
        brain = grey + white + csf
        means = {name: volume[m > 0.6].mean() for name, m in (("white", white), ("grey", grey), ("csf", csf))}
        background = volume[brain < 0.01].mean()
        assert means["white"] > means["grey"] > means["csf"] > background, (seed, means, background)
        assert background < 0.05 * means["white"], "the background is nearly black"
        assert volume.min() >= 0 and np.array_equal(volume, np.rint(volume)), "stored as integer MR intensities"
    # the head lies at a different place and size in each subject
    masses = [(tissue_maps(draw_subject(np.random.default_rng(s)), SIZE, SLICES)[1:].sum()).item() for s in (0, 1)]
    assert masses[0] != pytest.approx(masses[1], rel=1e-3)


def test_brain_needs_nifti_and_mr():
    with pytest.raises(UsageError, match="brain subjects are MR volumes written as NIfTI"):
        make_phantoms("unused", 1, "dicom", anatomy="brain")
    with pytest.raises(ConfigError, match="brain subjects need modality 'mr'"):
        load_config(None, ["data.dataset=folder", "data.root=x", "data.phantoms={anatomy: brain, modality: ct}"])
    with pytest.raises(ConfigError, match=r"data\.phantoms\.anatomy: .knee. is not one of body, brain"):
        load_config(None, ["data.dataset=folder", "data.root=x", "data.phantoms={anatomy: knee}"])


def test_cli_writes_brain_subjects_and_their_corrupted_copies(tmp_path):
    out = cdm("make-phantoms", "--out-dir", tmp_path / "b", "--n", 1, "--format", "nifti", "--anatomy", "brain",
              "--size", 16, "--slices", 4, "--seed", 5, "--corrupt", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted((tmp_path / "b").glob("*.nii.gz"))
    assert len(files) == 13, "the clean subject and 6 artifacts x 2 strengths"
    for path in files:
        image = nib.load(path)
        assert image.shape == (16, 16, 4)
        np.testing.assert_allclose(image.affine, brain_affine(16, 4), atol=1e-5)
    np.testing.assert_array_equal(volume_of(tmp_path / "b" / "phantom_0000.nii.gz"),
                                  brain_volume(np.random.default_rng(5), 16, 4))  # fmt: skip


def test_without_the_anatomy_extra_the_error_names_it(tmp_path):
    env = without_modules(tmp_path / "stubs", "nilearn")
    out = cdm("make-phantoms", "--out-dir", tmp_path / "b", "--n", 1, "--format", "nifti", "--anatomy", "brain",
              cwd=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: nilearn is not installed: pip install 'cdm-ood[anatomy]'" in out.stderr
    assert not (tmp_path / "b").exists(), "nothing is written"


def test_brain_configs_resolve(tmp_path):
    for name, size in (("brain-mr", 64), ("brain-mr-256", 256)):
        out = cdm("train", "--config", name, "--dry-run", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        config = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
        assert config.data.phantoms.anatomy == "brain" and config.data.preset == "mr"
        assert config.data.size == (size, size) and config.data.phantoms.size == size


def test_train_generates_brain_subjects_into_the_root(tmp_path):
    root = tmp_path / "brain"
    overrides = [f"data.root={root}", "data.phantoms.n=3", "data.phantoms.size=16", "data.phantoms.slices=6",
                 "data.size=[16, 16]", "model.channels=[8, 16]", "model.attention_levels=[false, false]",
                 "model.num_head_channels=8", "schedule.T=20", "train.batch_size=4", "train.threads=1",
                 "train.steps=4", "train.val_every=4", "train.checkpoint_every=4", "train.val_samples=8",
                 "optim.warmup_steps=1", "tracking.enabled=false"]  # fmt: skip
    model = train(load_config(Path(__file__).parent.parent / "configs" / "brain-mr.yaml", overrides), tmp_path / "run")
    assert sorted(p.name for p in root.glob("*.nii.gz")) == [f"phantom_000{i}.nii.gz" for i in range(3)]
    preset = load_model(model).spec.preset
    assert preset.name == "mr" and 0 <= preset.a_min < preset.a_max <= 4095, "fitted on the training subjects"
