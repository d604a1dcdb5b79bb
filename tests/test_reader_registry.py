"""A new input format is one file: a `FormatReader` registered with `register_reader`, defined here, is found by
`discover`, read by `iter_slices` and scored by `cdm-ood score` with no other change."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cdm_ood.cli import main
from cdm_ood.data import READERS, FormatReader, NotAnImageError, register_reader
from cdm_ood.data.discovery import detect_format, discover
from cdm_ood.data.formats.base import slice_of
from cdm_ood.data.formats.nifti import NiftiReader
from cdm_ood.data.guards import require_budget
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.readers import iter_slices
from cdm_ood.data.records import SourceFile
from cdm_ood.errors import UsageError

MAGIC = b"TOY-IMAGE"


class ToyReader(FormatReader):
    """A toy format: the line `TOY-IMAGE <rows> <columns>`, then the pixels as raw little-endian float32."""

    name = "test-toy"
    title = "toy"

    def detect(self, path, head):
        return head.startswith(MAGIC + b" ")

    def source(self, path, max_voxels):
        require_budget(path, _header(path)[0], max_voxels)
        return SourceFile(str(path), self.name, str(path))

    def slices(self, source):
        shape, offset = _header(source.path)
        pixels = np.fromfile(source.path, dtype="<f4", offset=offset).reshape(1, *shape)
        return [slice_of(pixels, source, 0)]


def _header(path) -> tuple[tuple[int, int], int]:
    with open(path, "rb") as f:
        line = f.readline()
    rows, columns = map(int, line.split()[1:])
    return (rows, columns), len(line)


def write_toy(path, image: np.ndarray) -> None:
    rows, columns = image.shape
    path.write_bytes(MAGIC + f" {rows} {columns}\n".encode() + image.astype("<f4").tobytes())


@pytest.fixture
def toy():
    yield register_reader(ToyReader)
    READERS.pop(ToyReader.name)


@pytest.fixture
def toy_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = phantom_volume(np.random.default_rng(5), size=16, slices=2)
    for k, image in enumerate(images):
        write_toy(folder / f"scan{k}.toy", image)
    return folder, images


def test_an_unregistered_format_is_not_an_image(toy_files):
    folder, _ = toy_files
    with pytest.raises(NotAnImageError, match="unrecognised content: not DICOM, NIfTI, NRRD, MetaImage, PNG or JPEG"):
        detect_format(folder / "scan0.toy")


def test_a_registered_reader_is_discovered_and_read(toy, toy_files):
    folder, images = toy_files
    with pytest.raises(UsageError, match="'nifti' is already registered"):
        register_reader(type("Other", (NiftiReader,), {}))
    assert detect_format(folder / "scan0.toy") == "test-toy"
    sources = discover(folder)
    assert [(s.format, s.volume_id) for s in sources] == [("test-toy", str(folder / f"scan{k}.toy")) for k in (0, 1)]
    slices = list(iter_slices(folder))
    assert len(slices) == 2
    for s, image in zip(slices, images, strict=True):
        np.testing.assert_array_equal(s.image, image[None])
        assert s.flags == ()


def test_a_registered_reader_is_read_by_the_voxel_budget(toy, toy_files):
    folder, _ = toy_files
    errors = []
    assert discover(folder, errors.append, max_voxels=100) == []
    assert [type(e).__name__ for e in errors] == ["TooLargeError", "TooLargeError"]


def test_score_scores_a_registered_format(toy, toy_files, checkpoint, tmp_path):
    folder, _ = toy_files
    out = CliRunner().invoke(main, ["score", str(folder), "--checkpoint", str(checkpoint), "--out",
                                    str(tmp_path / "r.json"), "--workers", "0"])  # fmt: skip
    assert out.exit_code in (0, 1), out.output
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    scored = [r for r in rows if r["level"] == "slice"]
    assert sorted(r["path"] for r in scored) == [str(folder / f"scan{k}.toy") for k in (0, 1)]
    assert {r["verdict"] for r in scored} <= {"in", "ood"}
    assert all(np.isfinite(r["score"]) for r in scored)
