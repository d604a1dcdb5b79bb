"""Anomaly maps as files a person or a viewer opens, all in one output folder (inputs are only read):

- `<stem>[_t<time point>]_s<slice:04d>_map.npy`: a slice's map (higher = more OOD) on the slice's own grid,
  float32, resized from the model's grid with MONAI `Resize` (bilinear, as the model input was resized);
- `..._map.png`: the slice, windowed to grey (its 1st to 99th percentile), under the map in colour
  (`COLORMAP`, more opaque where the map is higher; `score --maps` draws every map on one scale, `SCORE_DISPLAY`);
- `<stem>_map.nii.gz`: for a NIfTI volume or a DICOM series, the slice maps stacked with the input's geometry
  (NIfTI: its shape, voxel order and affine; DICOM: the affine of its ImageOrientationPatient,
  ImagePositionPatient and PixelSpacing, data `map[k].T` as `volume_files.write_nifti` stores a volume). Slices
  without a map (flagged, not scored) are NaN.

`<stem>` is the file name less its image suffix, or a DICOM series' folder name; a second input with the same
stem gets `<stem>-2`, and so on, in the order the inputs come, or in the order of `map_stems` over every
discovered file when the writer is given them (the same on every torchrun rank, so ranks never write the same
name for different inputs).

A map that cannot be written (a full disk, slices of a series that differ in size, ...) is that image's problem, never
the run's: `MapWriter` logs it and keeps it in `failures` (`score --maps` turns each into a `flagged` row of its
volume, `report.map_failure_row`) and goes on with the next map.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.discovery import SourceFile, detect_reader
from ..data.formats import FormatReader, reader_of
from ..data.guards import redact
from ..data.records import Slice, SliceSource, Volume
from ..data.transforms import LUMA
from ..data.volumes import volume_path
from ..data.writers import IMAGE_SUFFIXES
from ..utils.io import atomic_path, atomic_write

log = logging.getLogger("cdm_ood.ood")

COLORMAP = "inferno"  # matplotlib colormap of the map
ALPHA = 0.6  # opacity of the map's colour where it reaches the top of its display range (0 at the bottom)
# The PNGs' colour range of `score --maps`, in the units of the `map` detector's maps (`detectors.MapDetector`: the
# RMS of per-pixel z-scores, about 1 in distribution): clear at the in-distribution level, full at 5 deviations.
SCORE_DISPLAY = (1.0, 5.0)
MIN_PNG_SIDE = 256  # a smaller slice is enlarged by an integer factor (nearest neighbour) in its PNG
STEM_SUFFIXES = (*IMAGE_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img")


def to_native(amap: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A map on the model's grid, (H_m, W_m) or (D_m, H_m, W_m), resized to an image's grid `shape` (H, W) or
    (D, H, W) (bilinear or trilinear), float32."""
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    amap, shape = np.asarray(amap, dtype=np.float32), tuple(int(n) for n in shape)
    if amap.ndim not in (2, 3) or amap.ndim != len(shape):
        raise ValueError(f"expected a map of {len(shape)} dimensions like the image {shape}, got shape {amap.shape}")
    if amap.shape == shape:
        return amap.copy()
    mode = "bilinear" if amap.ndim == 2 else "trilinear"
    return convert_to_numpy(Resize(shape, mode=mode)(amap[None]), dtype=np.float32)[0]


def overlay(image: np.ndarray, amap: np.ndarray, display: Optional[tuple[float, float]] = None) -> np.ndarray:
    """An RGB uint8 picture of a slice `image` (C, H, W) in its own units, windowed to grey, under `amap` (H, W):
    its colour and opacity grow from the bottom to the top of `display` (by default the map's median and
    maximum). Enlarged to at least `MIN_PNG_SIDE` pixels."""
    from matplotlib import colormaps

    grey = np.nan_to_num(image[0] if image.shape[0] == 1 else np.tensordot(LUMA, image[:3], axes=1))
    lo, hi = np.percentile(grey, [1.0, 99.0])
    grey = np.clip((grey - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    finite = amap[np.isfinite(amap)]
    bottom, top = display or ((float(np.median(finite)), float(finite.max())) if finite.size else (0.0, 1.0))
    level = np.nan_to_num(np.clip((amap - bottom) / (top - bottom if top > bottom else 1.0), 0.0, 1.0))
    alpha = ALPHA * level[..., None]
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colormaps[COLORMAP](level)[..., :3]
    factor = max(1, math.ceil(MIN_PNG_SIDE / max(grey.shape)))
    return np.repeat(np.repeat(np.rint(rgb * 255).astype(np.uint8), factor, axis=0), factor, axis=1)


@dataclass(frozen=True)
class MapFailure:
    """A map that could not be written: the slice it maps (with `whole`, the volume's map file: a source with the
    volume's path and id) and why."""

    source: SliceSource
    reason: str
    whole: bool = False


@dataclass
class _Volume:
    """The map files written for one input volume (a file, or a DICOM series): its stem, the reader that writes
    its volume file (`FormatReader.write_map`; None: no volume file, a multi-frame DICOM file), volume id, and for
    each slice key (time point, index) its .npy map and input file."""

    stem: str
    writer: Optional[FormatReader]
    volume_id: str
    slices: dict[tuple[Optional[int], int], tuple[Path, str]] = field(default_factory=dict)
    pending: bool = False


class MapWriter:
    """Writes slices' anomaly maps into the folder `out` (see the module): `write` per slice, then `finish` for
    the volume files. A volume's file is written once its slices stop coming (a slice of another volume arrives)
    and again, whole, if more of its slices come later. `display` fixes the PNGs' colour range (map units).
    `sources`, every file discovered, name the volumes (`map_stems`; an input not among them gets a stem no
    other input has) and give each DICOM series its number of slices (else: up to its last slice with a map).
    A map that cannot be written is logged and kept in `failures`, never raised."""

    def __init__(
        self, out: str | Path, display: Optional[tuple[float, float]] = None, sources: Sequence[SourceFile] = ()
    ) -> None:
        self.out = Path(out)
        self.display = display
        self._stems = map_stems(sources)
        self._depths = Counter(f.volume_id for f in sources if f.index is not None)
        self._volumes: dict[str, _Volume] = {}
        self._current: Optional[str] = None
        self._written: dict[str, Path] = {}
        self.failures: list[MapFailure] = []

    def write(self, amap: np.ndarray, s: Slice) -> list[Path]:
        """Write the map (H_m, W_m) of slice `s` as .npy on the slice's grid and as a PNG overlay; returns both (none
        when they cannot be written: see `failures`)."""
        key = _volume_key(s.source)
        if key != self._current:
            self._flush()
            self._current = key
        try:
            return self._write_slice(amap, s, key)
        except Exception as err:  # any failure to write a map is this slice's, never the run's
            self._failed(MapFailure(s.source, _reason(err)))
            return []

    def _write_slice(self, amap: np.ndarray, s: Slice, key: str) -> list[Path]:
        volume = self._volumes.get(key) or self._new_volume(key, s.source)
        native = to_native(amap, s.image.shape[-2:])
        t, index = s.source.time_point, s.source.index
        name = f"{volume.stem}{'' if t is None else f'_t{t}'}_s{index:04d}_map"
        npy, png = self.out / f"{name}.npy", self.out / f"{name}.png"
        with atomic_write(npy, "wb") as f:
            np.save(f, native)
        _save_png(overlay(s.image, native, self.display), png)
        if volume.writer is not None:
            volume.slices[(t, index)] = (npy, s.source.path)
            volume.pending = True
        return [npy, png]

    def write_volume(self, amap: np.ndarray, volume: Volume, files: Sequence[SourceFile]) -> list[Path]:
        """Write the map (D_m, H_m, W_m) of a whole `volume` (a 3D model's, read from the discovered `files`) as
        the maps of its slices, resized to the volume's grid (MONAI `Resize`, trilinear); returns their files."""
        try:
            native = to_native(amap, volume.image.shape[-3:])
            slices = _volume_slices(volume, files)
        except Exception as err:  # this volume's failure, never the run's
            self._failed(MapFailure(volume.source, _reason(err), whole=True))
            return []
        return [path for k, s in enumerate(slices) for path in self.write(native[k], s)]

    def pop_failures(self) -> list[MapFailure]:
        """The failures since the last call (and forget them)."""
        failures, self.failures = self.failures, []
        return failures

    def _failed(self, failure: MapFailure) -> None:
        log.warning("%s: map not written: %s", failure.source.path, failure.reason)
        self.failures.append(failure)

    def finish(self) -> list[Path]:
        """Write the volume files still due; returns every volume file written."""
        self._flush(every=True)
        return list(self._written.values())

    def _flush(self, every: bool = False) -> None:
        for key, volume in self._volumes.items():
            if volume.pending and (every or key == self._current):
                volume.pending = False
                path = self.out / f"{volume.stem}_map.nii.gz"
                try:
                    if not volume.writer.write_map(volume.slices, path, self._depths[key]):
                        continue
                except Exception as err:  # this volume's failure, never the run's
                    where = volume_path([file for _, file in volume.slices.values()])
                    self._failed(MapFailure(SliceSource(where, 0, volume.volume_id), f"{path.name}: {_reason(err)}",
                                            whole=True))  # fmt: skip
                    continue
                self._written[key] = path

    def _new_volume(self, key: str, source: SliceSource) -> _Volume:
        reader = detect_reader(source.path)
        series = reader.series and source.frame is None
        taken = {v.stem for v in self._volumes.values()} | set(self._stems.values())
        stem = self._stems.get(key) or _free_stem(_base_stem(source.path, series), taken)
        volume = _Volume(stem, reader if series or not reader.series else None, source.volume_id)
        self._volumes[key] = volume
        return volume


def map_stems(sources: Sequence[SourceFile]) -> dict[str, str]:
    """The stem of every volume of the discovered `sources`, in their order: the file name less its suffix (a
    DICOM series: its folder's name), `-2`, `-3`... for a stem already taken."""
    stems: dict[str, str] = {}
    for f in sources:
        series = f.index is not None
        key = f.volume_id if series or not reader_of(f.format).series else f.path
        if key not in stems:
            stems[key] = _free_stem(_base_stem(f.path, series), set(stems.values()))
    return stems


def overlay_index(out: str | Path, stems: Mapping[str, str]) -> dict[str, list[tuple[int, Path]]]:
    """The slice overlays (`*_s<slice>_map.png`) in the maps folder `out`, by volume id (`stems`: volume id ->
    stem, `map_outputs.map_stems`), listing the folder once."""
    volume_of = {stem: volume for volume, stem in stems.items()}
    pattern = re.compile(r"^(?P<stem>.+?)(?:_t\d+)?_s(?P<slice>\d{4,})_map\.png$")
    found: dict[str, list[tuple[int, Path]]] = {}
    for entry in Path(out).iterdir():
        match = pattern.match(entry.name)
        if match and match["stem"] in volume_of:
            found.setdefault(volume_of[match["stem"]], []).append((int(match["slice"]), entry))
    return found


def write_maps(out: str | Path, maps: Iterable[tuple[np.ndarray, Slice]], **kwargs) -> list[Path]:
    """Every file of `MapWriter(out, **kwargs)` for (map, slice) pairs: the slice files, then the volume files (a map
    that cannot be written is logged and left out)."""
    writer = MapWriter(out, **kwargs)
    written = [path for amap, s in maps for path in writer.write(amap, s)]
    return written + writer.finish()


def _volume_slices(volume: Volume, files: Sequence[SourceFile]) -> list[Slice]:
    """The slices of a volume stacked by `data.volumes.stack_volumes`, each with the source the readers give it:
    a file per slice (a DICOM series, in index order), or one file of slices (frames of a multi-frame DICOM)."""
    image, t = volume.image, volume.source.time_point
    if len(files) == image.shape[1] and all(f.index is not None for f in files):
        ordered = sorted(files, key=lambda f: f.index)
        sources = [SliceSource(f.path, f.index, f.volume_id, f.sop_instance_uid) for f in ordered]
    else:
        (f,) = files
        frames = reader_of(f.format).series
        sources = [SliceSource(f.path, k, f.volume_id, f.sop_instance_uid, k if frames else None, t)
                   for k in range(image.shape[1])]  # fmt: skip
    return [Slice(image[:, k], source) for k, source in enumerate(sources)]


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {redact(err)}"


def _volume_key(source: SliceSource) -> str:
    """The volume a slice belongs to: its series or file (a multi-frame DICOM file is its own volume)."""
    return source.path if source.frame is not None else source.volume_id


def _base_stem(path: str, series: bool) -> str:
    """A DICOM series' folder name, or a file's name less its image suffix."""
    if series:
        return Path(path).parent.name
    name = Path(path).name
    known = next((k for k in STEM_SUFFIXES if name.lower().endswith(k)), "")
    return name[: len(name) - len(known)] or name


def _free_stem(base: str, taken: set[str]) -> str:
    stem, n = base, 1
    while stem in taken:
        n += 1
        stem = f"{base}-{n}"
    return stem


def _save_png(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
