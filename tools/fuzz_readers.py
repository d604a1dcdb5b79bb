"""Coverage-guided fuzzing (atheris, libFuzzer) of the readers behind `iter_slices`: DICOM, NIfTI, PNG/JPEG and
NRRD/MetaImage. Every input must end as slices or as exactly one `DataError` (a row of the report): any other
exception, a hang past the per-input time limit or memory past the budget is a crash, which libFuzzer writes as
`crash-*` / `timeout-*` / `oom-*` into the current folder; copy it into `tests/fuzz/crashers/` with its fix
(`tests/test_fuzz.py` reads every file there and every seed on each `make test`).

    python tools/fuzz_readers.py --seeds                 # (re)write the seed corpus tests/fuzz/corpus/
    make fuzz                                            # fuzz for FUZZ_SECONDS (default 600) from the seeds

An input is one selector byte (which file name suffix the bytes are written under: `SUFFIXES`) and the file's
bytes; the seeds are small valid files of every format, written by the package's own writers.
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".nrrd", ".mha", "")
BUDGET = 1 << 20  # voxels: a fuzzed header may declare any size, and is refused from it above this


def split(data: bytes) -> tuple[str, bytes]:
    """(suffix, file bytes) of a fuzzer input."""
    return (SUFFIXES[data[0] % len(SUFFIXES)], data[1:]) if data else ("", b"")


def read_input(data: bytes, folder: Path) -> tuple[int, list]:
    """The input written as a file in `folder` and read as `cdm-ood score` reads it: (slices, DataErrors)."""
    from cdm_ood.data.readers import iter_slices

    suffix, body = split(data)
    path = folder / f"input{suffix}"
    path.write_bytes(body)
    errors: list = []
    try:
        slices = sum(1 for _ in iter_slices([path], errors.append, BUDGET))
    finally:
        path.unlink()
    return slices, errors


def check(data: bytes, folder: Path) -> None:
    """Raise unless the input gave slices and no error, or no slice and one `DataError`."""
    slices, errors = read_input(data, folder)
    if not ((slices and not errors) or (not slices and len(errors) == 1)):
        raise AssertionError(f"{slices} slices and {len(errors)} errors: {errors[:3]}")


def write_seeds() -> None:
    """Small valid files of every format, each behind its selector byte."""
    import numpy as np
    from PIL import Image

    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series, write_nifti

    CORPUS.mkdir(parents=True, exist_ok=True)
    volume = phantom_volume(np.random.default_rng(0), size=16, slices=2)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        write_dicom_series(volume, Path(tmp) / "series", modality="ct", volume_index=0)
        files[".dcm"] = sorted((Path(tmp) / "series").iterdir())[0]
        write_nifti(volume, Path(tmp) / "v.nii.gz")
        (Path(tmp) / "v.nii").write_bytes(gzip.decompress((Path(tmp) / "v.nii.gz").read_bytes()))
        files.update({".nii.gz": Path(tmp) / "v.nii.gz", ".nii": Path(tmp) / "v.nii"})
        grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
        for suffix in (".png", ".jpg"):
            Image.fromarray(grey).save(Path(tmp) / f"i{suffix}")
            files[suffix] = Path(tmp) / f"i{suffix}"
        for suffix, text in ((".nrrd", _nrrd(grey)), (".mha", _mha(grey))):
            (Path(tmp) / f"h{suffix}").write_bytes(text)
            files[suffix] = Path(tmp) / f"h{suffix}"
        for suffix, path in files.items():
            name = suffix.strip(".").replace(".", "-")
            (CORPUS / f"seed-{name}").write_bytes(bytes([SUFFIXES.index(suffix)]) + path.read_bytes())


def _nrrd(pixels) -> bytes:
    header = f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {pixels.shape[1]} {pixels.shape[0]}\nencoding: raw\n\n"
    return header.encode() + pixels.tobytes()


def _mha(pixels) -> bytes:
    header = (f"ObjectType = Image\nNDims = 2\nDimSize = {pixels.shape[1]} {pixels.shape[0]}\n"
              "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n")  # fmt: skip
    return header.encode() + pixels.tobytes()


def fuzz(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["cdm_ood"]):
        import cdm_ood.data.readers  # noqa: F401

    folder = Path(tempfile.mkdtemp(prefix="cdm-ood-fuzz-"))
    atheris.Setup(argv, lambda data: check(data, folder))
    atheris.Fuzz()


if __name__ == "__main__":
    if sys.argv[1:] == ["--seeds"]:
        write_seeds()
    else:
        fuzz(sys.argv)
