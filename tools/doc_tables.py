"""The parameter tables of the docs, printed from the code that defines them (blocks of `benchmarks/tables.py`).

    python tools/doc_tables.py

- `artifact-strengths`: every artifact of `cdm_ood.data.artifacts` and its parameter at each strength
  (`ARTIFACTS`: mild, strong; `REJECT`: reject);
- `detector-costs`: every detector of `cdm_ood.ood.detectors` and its cost per image in forward-pass equivalents
  (`Detector.cost`: a backward pass counts as two), for 2D images and 3D volumes, of an unconditional model and of
  a model with LABELS class labels;
- `corpus-series`: what discovery makes of the test files that pydicom and nibabel install: files read, volumes,
  DICOM series split into volumes (`cdm_ood.data.series`), files flagged by their headers, files refused by kind.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from tables import emit, markdown

from cdm_ood.data.artifacts import ARTIFACTS, REJECT
from cdm_ood.data.discovery import discover
from cdm_ood.data.errors import DataError
from cdm_ood.ood.detectors import DETECTORS

LABELS = 10


def artifact_strengths() -> str:
    rows = [[f"`{name}`", *(f"{ARTIFACTS.get(name, {}).get(s, '-')}" for s in ("mild", "strong")), f"{reject:g}"]
            for name, reject in REJECT.items()]  # fmt: skip
    return markdown(["artifact", "mild", "strong", "reject"], rows)


def detector_costs() -> str:
    rows = []
    for name, kind in DETECTORS.items():
        plain = kind(1) if kind.applies_to(None) else None
        labelled = kind(1, num_classes=LABELS)
        rows.append([f"`{name}`", *(f"{plain.cost(d):g}" if plain else "-" for d in (2, 3)),
                     *(f"{labelled.cost(d):g}" for d in (2, 3))])  # fmt: skip
    header = ["detector", "2D image", "3D volume", f"2D image, {LABELS} labels", f"3D volume, {LABELS} labels"]
    return markdown(header, rows)


def corpus_series() -> str:
    import nibabel
    import pydicom

    rows = []
    for package, root in ((pydicom, Path(pydicom.__file__).parent / "data" / "test_files"),
                          (nibabel, Path(nibabel.__file__).parent / "tests" / "data")):  # fmt: skip
        errors: list[DataError] = []
        found = discover(root, errors.append)
        split = {f.volume_id.split("[")[0] for f in found if f.part}
        parts = {f.volume_id for f in found if f.part}
        kinds = Counter(e.kind for e in errors)
        rows.append([f"{package.__name__} {package.__version__}",
                     len(found) + len(errors), len(found), len({f.volume_id for f in found}),
                     f"{len(split)} into {len(parts)}", sum(bool(f.flags) for f in found),
                     ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))])  # fmt: skip
    header = ["corpus", "files", "read", "volumes", "series split", "files flagged", "files refused"]
    return markdown(header, rows)


if __name__ == "__main__":
    emit("artifact-strengths", artifact_strengths())
    emit("detector-costs", detector_costs())
    emit("corpus-series", corpus_series())
