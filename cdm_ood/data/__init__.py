"""Data layer: readers for DICOM / NIfTI / NRRD / MetaImage / PNG (a registry: `register_reader`), intensity
presets and transforms, datasets and phantoms."""

from .artifacts import ARTIFACTS
from .discovery import SourceFile, detect_format, discover
from .errors import DataError, NotAnImageError, UnreadableFileError, UnsupportedFormatError
from .formats import READERS, FormatReader, register_reader
from .medical import medical_dataset, split_volumes
from .natural import NATURAL_DATASETS, load_natural
from .phantom_sets import make_phantoms
from .presets import PRESETS, IntensityPreset, fit_mr_preset, make_preset
from .readers import iter_slices, read_file, read_source
from .records import FLAG_CONSTANT, FLAG_NONFINITE, Slice, SliceSource, Volume
from .transforms import ImageTransformd, ToChannels, ToChannelsd, image_transform
from .volumes import iter_volumes

__all__ = [
    "ARTIFACTS",
    "FLAG_CONSTANT",
    "FLAG_NONFINITE",
    "NATURAL_DATASETS",
    "PRESETS",
    "READERS",
    "DataError",
    "FormatReader",
    "ImageTransformd",
    "IntensityPreset",
    "NotAnImageError",
    "Slice",
    "SliceSource",
    "SourceFile",
    "ToChannels",
    "ToChannelsd",
    "UnreadableFileError",
    "UnsupportedFormatError",
    "Volume",
    "detect_format",
    "discover",
    "fit_mr_preset",
    "image_transform",
    "iter_slices",
    "iter_volumes",
    "load_natural",
    "make_phantoms",
    "make_preset",
    "medical_dataset",
    "read_file",
    "read_source",
    "register_reader",
    "split_volumes",
]
