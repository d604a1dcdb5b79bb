"""Data layer: readers for DICOM / NIfTI / PNG, intensity presets and transforms, datasets and phantoms."""

from .errors import DataError, NotAnImageError, UnreadableFileError, UnsupportedFormatError
from .medical import medical_dataset, split_volumes
from .natural import NATURAL_DATASETS, load_natural
from .phantoms import ARTIFACTS, make_phantoms
from .presets import PRESETS, IntensityPreset, fit_mr_preset, make_preset
from .readers import SourceFile, detect_format, discover, iter_slices, read_file, read_source
from .records import FLAG_CONSTANT, FLAG_NONFINITE, Slice, SliceSource
from .transforms import SliceTransformd, ToChannels, ToChannelsd, slice_transform

__all__ = [
    "ARTIFACTS",
    "FLAG_CONSTANT",
    "FLAG_NONFINITE",
    "NATURAL_DATASETS",
    "PRESETS",
    "DataError",
    "IntensityPreset",
    "NotAnImageError",
    "Slice",
    "SliceSource",
    "SliceTransformd",
    "SourceFile",
    "ToChannels",
    "ToChannelsd",
    "UnreadableFileError",
    "UnsupportedFormatError",
    "detect_format",
    "discover",
    "fit_mr_preset",
    "iter_slices",
    "load_natural",
    "make_phantoms",
    "make_preset",
    "medical_dataset",
    "read_file",
    "read_source",
    "slice_transform",
    "split_volumes",
]
