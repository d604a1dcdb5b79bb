"""The input formats, each a `FormatReader` registered in `READERS`, in the order they are asked: DICOM, NIfTI,
NRRD/MetaImage (`itk`), PNG/JPEG (`image`). A new format is one module like these, whose reader is registered with
`register_reader`."""

# isort: off
from . import dicom, nifti, itk, image  # noqa: F401  (registers the built-in readers, in the order they are asked)

# isort: on
from .base import CONTEXT_COLUMNS, READERS, FormatReader, SeriesSlice, SliceKey, reader_of, register_reader

__all__ = ["CONTEXT_COLUMNS", "READERS", "FormatReader", "SeriesSlice", "SliceKey", "reader_of", "register_reader"]
