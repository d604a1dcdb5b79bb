"""Compressed DICOM as PACS exports it, decoded by pydicom's pixel-data plugins of the `cdm-ood[codecs]` extra:
real files encoded here (RLE by pydicom, the JPEG family by libjpeg-turbo, CharLS and OpenJPEG), read through the
reader and the real `cdm-ood score` process, compared with the same pixels stored uncompressed."""

import json

import numpy as np
import pydicom
import pytest
from dicom_factory import compressed, twelve_bit_ct, write
from processes import cdm, without_modules
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from cdm_ood.data import UnsupportedFormatError, read_file
from cdm_ood.data.phantoms import phantom_volume

LOSSLESS = (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless)
# The decoders of the extra, and the optional ones pydicom would also try, made unimportable in a process.
PLUGINS = ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One phantom CT slice stored uncompressed (`plain.dcm`) and in each compressed transfer syntax, each file
    its own series; returns the folder and the file of each syntax."""
    folder = tmp_path_factory.mktemp("pacs")
    hu = phantom_volume(np.random.default_rng(3), size=16, slices=1)[0]
    original = twelve_bit_ct(np.clip(hu + 1024, 0, 4095))
    write(original, folder / "plain.dcm")
    files = {}
    for syntax in (*LOSSLESS, JPEGExtended12Bit):
        files[syntax] = write(compressed(original, syntax), folder / f"{syntax.keyword}.dcm")
        assert pydicom.dcmread(files[syntax]).file_meta.TransferSyntaxUID == syntax, "the file is really compressed"
    return folder, files


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(archive, syntax):
    folder, files = archive
    (plain,) = read_file(folder / "plain.dcm")
    (decoded,) = read_file(files[syntax])
    np.testing.assert_array_equal(decoded.image, plain.image)
    assert decoded.image.min() < -900 and decoded.image.max() > 0, "Hounsfield units after the modality LUT"


def test_12_bit_jpeg_extended_decodes_close_to_the_original(archive):
    folder, files = archive
    (plain,) = read_file(folder / "plain.dcm")
    (decoded,) = read_file(files[JPEGExtended12Bit])
    error = np.abs(decoded.image - plain.image)
    assert error.max() <= 16 and error.mean() < 4, "lossy, but 12-bit: a few HU at most"


def test_score_reads_every_compressed_file_like_the_uncompressed_one(checkpoint, archive, tmp_path):
    folder, files = archive
    out = cdm("score", folder, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--no-fail", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert not [r for r in rows if r["level"] == "file"], "no file is unreadable or unsupported"
    score = {r["path"]: r["score"] for r in rows if r["level"] == "slice"}
    assert set(score) == {str(folder / "plain.dcm"), *map(str, files.values())}
    for syntax in LOSSLESS:
        assert score[str(files[syntax])] == pytest.approx(score[str(folder / "plain.dcm")], rel=1e-5), syntax.name


def test_without_the_codecs_extra_the_reason_names_it(checkpoint, archive, tmp_path):
    folder, files = archive
    env = without_modules(tmp_path / "stubs", *PLUGINS)
    syntaxes = (JPEGLosslessSV1, JPEGLSLossless, JPEGExtended12Bit)  # none of them decodes without the plugins
    out = cdm("score", *(files[s] for s in syntaxes), folder / "plain.dcm", "--checkpoint", checkpoint, "--out",
              tmp_path / "r.json", cwd=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    reasons = {r["path"]: r["reason"] for r in rows if r["level"] == "file"}
    assert set(reasons) == {str(files[s]) for s in syntaxes}, "the uncompressed file is still read"
    for syntax in syntaxes:
        reason = reasons[str(files[syntax])]
        assert reason.startswith("UnsupportedFormatError") and "install cdm-ood[codecs]" in reason, reason
        assert syntax.name in reason and str(syntax) in reason


def test_a_syntax_without_decoder_is_unsupported(tmp_path):
    for syntax, name in (("1.2.840.10008.1.2.4.100", "MPEG2"), ("1.2.826.0.1.3680043.9.9999.1", "1.2.826")):
        ds = twelve_bit_ct(np.zeros((4, 4)))
        ds.file_meta.TransferSyntaxUID = syntax  # a video syntax, and a private one
        ds.PixelData = encapsulate([bytes(16)])
        ds["PixelData"].VR = "OB"
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
        with pytest.raises(UnsupportedFormatError, match=f"'{name}.*pydicom has no decoder for it"):
            read_file(path)
