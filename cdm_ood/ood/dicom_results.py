"""Gate results as DICOM objects that a viewer shows and a router acts on (highdicom), for every DICOM volume of a
run (a series, a part of a split series, a multi-frame file):

- `<stem>_sr.dcm`: a Comprehensive SR whose content is the verdict (a code of `SCHEME`), the score and threshold,
  the detector, the model (its checkpoint's content digest), the volume id and the reason, and an IMAGE item per
  source instance; its evidence lists the source instances by UID;
- `<stem>_map.dcm`: the anomaly map of its scored slices as a Parametric Map (float, one frame per source slice, on
  the source's frame of reference and plane positions), from the slice maps `score --maps` wrote.

Each object has new SOP and series UIDs and the source's patient and study modules (it belongs to the same
patient): identifiers go into these objects only, never into a log line, a report's text or MLflow. The sources are
read without their pixels and never written; type 2 patient and study attributes a source lacks are empty in the
result (as the standard allows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..data.discovery import SourceFile
from ..data.formats import reader_of
from ..data.guards import quiet_libraries, redact
from ..data.records import SliceSource
from ..data.volumes import volume_groups, volume_path
from ..utils.io import atomic_path
from .map_outputs import SCORE_DISPLAY, MapFailure, map_stems
from .report import FLAGGED, IN, OOD

log = logging.getLogger("cdm_ood.ood")

SCHEME = "99CDMOOD"  # the private coding scheme of cdm-ood's concepts (DICOM PS3.16: '99' schemes are local)
VERDICTS = {IN: "In distribution", OOD: "Out of distribution", FLAGGED: "Not scored: flagged"}
SR_SERIES_NUMBER, MAP_SERIES_NUMBER = 9901, 9902  # numbers of the result series, after a scanner's own
# Type 2 attributes of the patient and study modules that a result object must hold (empty when the source lacks
# them).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _concept(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, SCHEME, meaning)


def _no_units():
    import highdicom as hd

    return hd.sr.CodedConcept("1", "UCUM", "no units")


def source_headers(paths: Sequence[str]) -> list[Any]:
    """The headers (no pixels) of a volume's source files, in its order, with the type 2 patient and study
    attributes they lack added empty (in memory only)."""
    import pydicom

    headers = []
    for path in paths:
        with quiet_libraries():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        headers.append(ds)
    return headers


def verdict_sr(sources: Sequence[Any], row: Mapping[str, Any], info: Mapping[str, Any]) -> Any:
    """The Comprehensive SR of one volume's report `row` (verdict, score, threshold, reason, volume) and the run's
    `info` (detector, checkpoint digest), referencing the `sources` (headers of the volume's files)."""
    import highdicom as hd

    items = [
        hd.sr.CodeContentItem(
            _concept("verdict", "Verdict"),
            _concept(row["verdict"], VERDICTS[row["verdict"]]),
            relationship_type="CONTAINS",
        )
    ]
    if row["score"] is not None:
        items.append(hd.sr.NumContentItem(_concept("score", "Score"), float(row["score"]), _no_units(),
                                          relationship_type="CONTAINS"))  # fmt: skip
    items.append(hd.sr.NumContentItem(_concept("threshold", "Threshold"), float(row["threshold"]), _no_units(),
                                      relationship_type="CONTAINS"))  # fmt: skip
    texts = {"detector": ("Detector", info.get("detector")), "model": ("Model", info.get("checkpoint_digest")),
             "volume": ("Volume", row["volume"]), "reason": ("Reason", row["reason"])}  # fmt: skip
    items += [hd.sr.TextContentItem(_concept(code, meaning), str(value), relationship_type="CONTAINS")
              for code, (meaning, value) in texts.items() if value]  # fmt: skip
    items += [hd.sr.ImageContentItem(_concept("source", "Source image"), ds.SOPClassUID, ds.SOPInstanceUID,
                                     relationship_type="CONTAINS") for ds in sources]  # fmt: skip
    root = hd.sr.ContainerContentItem(_concept("result", "cdm-ood OOD gate result"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        sources, root, hd.UID(), SR_SERIES_NUMBER, hd.UID(), 1, manufacturer="cdm-ood", is_complete=True,
        series_description="cdm-ood OOD gate result",
    )  # fmt: skip
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: reasons are written as they are
    return sr


def parametric_map(sources: Sequence[Any], maps: np.ndarray) -> Any:
    """The Parametric Map of `maps` (frames, H, W), frame k the map of source k (single-frame headers), or with one
    multi-frame source, its frames in order; displayed over `map_outputs.SCORE_DISPLAY`, as the PNG overlays."""
    import highdicom as hd

    bottom, top = SCORE_DISPLAY
    finite = maps[np.isfinite(maps)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly", lut_explanation="cdm-ood anomaly map (higher = more out of distribution)",
        unit=_no_units(), value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0,
    )  # fmt: skip
    pm = hd.pm.ParametricMap(
        sources, maps.astype(np.float32), hd.UID(), MAP_SERIES_NUMBER, hd.UID(), 1, manufacturer="cdm-ood",
        manufacturer_model_name="cdm-ood", software_versions=__version__, device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.content.VOILUTTransformation(
            window_center=(bottom + top) / 2, window_width=top - bottom,
            window_explanation="cdm-ood map display (as the PNG overlays)")],
        content_label="ANOMALY", content_description="cdm-ood anomaly map", series_description="cdm-ood anomaly map",
    )  # fmt: skip
    if "Laterality" not in pm:  # general series, type 2C: empty when the source does not say (none of the sources)
        pm.Laterality = sources[0].get("Laterality", "")
    return pm


def _slice_maps(stem: str, files: Sequence[SourceFile], folder: Path) -> tuple[list[str], np.ndarray]:
    """The source files of a volume (its maps' `stem`) that have slice maps in `folder`, and those maps stacked
    (frames, H, W): the slices of a series that have one, or every frame of one multi-frame file (NaN where a frame
    has none); none when no slice has one."""
    if all(f.index is not None for f in files):
        found = [(f.path, folder / f"{stem}_s{f.index:04d}_map.npy") for f in files]
        found = [(path, npy) for path, npy in found if npy.is_file()]
        return [path for path, _ in found], np.stack([np.load(npy) for _, npy in found]) if found else np.empty(0)
    (f,) = files
    frames = {int(p.name[len(stem) + 2 : -8]): np.load(p) for p in folder.glob(f"{stem}_s[0-9][0-9][0-9][0-9]_map.npy")}
    if not frames:
        return [], np.empty(0)
    stack = np.full((max(frames) + 1, *next(iter(frames.values())).shape), np.nan, np.float32)
    for k, amap in frames.items():
        stack[k] = amap
    return [f.path], stack


def _dicom_volumes(rows: Sequence[dict], found: Sequence[SourceFile]) -> list[tuple[str, list[SourceFile], dict]]:
    """(stem, files, volume row) of every volume of `rows` whose files (among the discovered `found`) are DICOM
    instances, in discovery order."""
    verdicts = {r["volume"]: r for r in rows if r["level"] == "volume"}
    stems = map_stems(found)
    return [(stems[files[0].volume_id if files[0].index is not None else files[0].path], files,
             verdicts[files[0].volume_id]) for files in volume_groups(found)
            if reader_of(files[0].format).instances and files[0].volume_id in verdicts]  # fmt: skip


def write_parametric_maps(
    rows: Sequence[dict], found: Sequence[SourceFile], folder: Path
) -> tuple[list[Path], list[MapFailure]]:
    """`<stem>_map.dcm` into `folder` for each DICOM volume of the run's `rows` with a slice map there (the
    discovered files `found` name them); a volume whose map cannot be written gets a `MapFailure` (the run goes on,
    `score --maps` flags the volume)."""
    return _each(rows, found, folder, "map", lambda stem, files, row: _map_of(stem, files, folder))


def write_verdict_srs(
    rows: Sequence[dict], found: Sequence[SourceFile], folder: Path, info: Mapping[str, Any]
) -> tuple[list[Path], list[MapFailure]]:
    """`<stem>_sr.dcm` into `folder` for each DICOM volume of the run's `rows` (its final verdict: write the maps
    first); a volume whose SR cannot be written gets a `MapFailure`."""

    def make(stem: str, files: list[SourceFile], row: dict) -> Any:
        return verdict_sr(source_headers([f.path for f in files]), row, info)

    return _each(rows, found, folder, "sr", make)


def _map_of(stem: str, files: Sequence[SourceFile], folder: Path) -> Optional[Any]:
    paths, maps = _slice_maps(stem, files, folder)
    return parametric_map(source_headers(paths), maps) if paths else None


def _each(
    rows: Sequence[dict], found: Sequence[SourceFile], folder: Path, kind: str,
    make: Callable[[str, list[SourceFile], dict], Optional[Any]],
) -> tuple[list[Path], list[MapFailure]]:  # fmt: skip
    """`make(stem, files, row)` for each DICOM volume, saved as `<stem>_<kind>.dcm` (None: nothing to save)."""
    written: list[Path] = []
    failures: list[MapFailure] = []
    for stem, files, row in _dicom_volumes(rows, found):
        out = folder / f"{stem}_{kind}.dcm"
        try:
            ds = make(stem, files, row)
            if ds is not None:
                with atomic_path(out) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
                written.append(out)
        except Exception as err:  # this volume's failure, never the run's
            where = SliceSource(volume_path([f.path for f in files]), 0, files[0].volume_id)
            failures.append(MapFailure(where, f"{out.name}: {type(err).__name__}: {redact(err)}", whole=True))
            log.warning("%s: DICOM result not written: %s", where.path, failures[-1].reason)
    return written, failures
