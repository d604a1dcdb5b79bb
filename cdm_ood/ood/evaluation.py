"""Evaluation of every calibrated detector on labelled in-distribution and OOD image sets."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from ..data.errors import DataError
from ..data.volumes import iter_inputs
from ..data.walk import DEFAULT_IGNORE
from ..errors import UsageError
from ..model.checkpoint import LoadedModel
from ..utils.figures import plot_histogram, plot_roc
from ..utils.io import atomic_write, write_csv_atomic
from ..utils.progress import ProgressFactory
from .api import Inputs, OODDetector
from .detectors import Features, required_features
from .features import concat_features
from .metrics import ood_metrics

METRIC_COLUMNS = ("detector", "ood_set", "n_id", "n_ood", "auroc", "fpr95", "aupr_in", "aupr_out")


def evaluate_sets(
    model: LoadedModel,
    id_images: Sequence[Inputs],
    ood_sets: Mapping[str, Sequence[Inputs]],
    out: str | Path,
    batch_size: int = 64,
    progress: Callable[[int], Any] = lambda n: None,
) -> list[dict]:
    """Metrics rows (detector x OOD set), plus metrics.csv/json, roc_<detector>.png and hist_<detector>.png in
    `out`. The features of each image are computed once and shared by all detectors; `progress(n)` is called after
    each batch of `n` images."""
    names = sorted(model.calibration.detectors) if model.calibration else ["nll"]
    scorers = [OODDetector(model, name, batch_size=batch_size) for name in names]
    needs = required_features(names, model.spec.model.num_classes)

    def features(images: Sequence[Inputs]) -> Features:
        chunks = []
        for i in range(0, len(images), batch_size):
            chunks.append(scorers[0].features(scorers[0].prepare(list(images[i : i + batch_size])), needs))
            progress(min(batch_size, len(images) - i))
        return concat_features(chunks)

    id_features = features(id_images)
    ood_features = {k: features(v) for k, v in ood_sets.items()}
    out = Path(out)
    rows = []
    for scorer in scorers:
        id_scores = scorer.score_features(id_features)
        sets = {k: scorer.score_features(v) for k, v in ood_features.items()}
        for name, scores in sets.items():
            rows.append({"detector": scorer.name, "ood_set": name, "n_id": len(id_scores), "n_ood": len(scores),
                         **ood_metrics(id_scores, scores)})  # fmt: skip
        plot_roc(id_scores, sets, out / f"roc_{scorer.name}.png", title=f"{scorer.name} detector")
        plot_histogram({"in-distribution": id_scores, **sets}, out / f"hist_{scorer.name}.png",
                       scorer.threshold if scorer.id_scores is not None else None, f"{scorer.name} score")  # fmt: skip
    write_csv_atomic(out / "metrics.csv", METRIC_COLUMNS, rows, for_people=True)
    with atomic_write(out / "metrics.json") as f:
        json.dump(rows, f, indent=1)
    return rows


def evaluate_paths(
    model: LoadedModel,
    id_paths: Sequence[str | Path],
    ood_paths: Mapping[str, Sequence[str | Path]],
    out: str | Path,
    batch_size: int = 64,
    on_error: Optional[Callable[[DataError], None]] = None,
    progress: Optional[ProgressFactory] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> list[dict]:
    """`evaluate_sets` on the scorable slices (whole volumes for a 3D model) below the in-distribution paths and
    below each named OOD set's paths; files that cannot be read go to `on_error`, files in folders matched by an
    `ignore` glob are left out; a set without a scorable slice is a `UsageError`. `progress(total, "evaluating")`,
    once the slices are read, returns the function to call with each number of slices scored."""

    def scorable(paths: Sequence[str | Path]) -> list:
        return [s for s in iter_inputs(list(paths), model.spec.spatial_dims, on_error, ignore) if not s.flags]

    id_images = scorable(id_paths)
    ood_images = {name: scorable(paths) for name, paths in ood_paths.items()}
    empty = [name for name, images in {"in-distribution": id_images, **ood_images}.items() if not images]
    if empty:
        raise UsageError(f"no readable {model.spec.unit}s in {', '.join(empty)}")
    total = len(id_images) + sum(map(len, ood_images.values()))
    update = progress(total, "evaluating") if progress is not None else (lambda n: None)
    return evaluate_sets(model, id_images, ood_images, out, batch_size, update)


def format_table(rows: Sequence[dict]) -> str:
    """The metrics rows as an aligned text table."""
    header = [f"{c:>10}" if i > 1 else f"{c:<18}" for i, c in enumerate(METRIC_COLUMNS)]
    lines = ["".join(header)]
    for r in rows:
        cells = [f"{r[c]:<18}" for c in METRIC_COLUMNS[:2]] + [f"{r[c]:>10}" for c in METRIC_COLUMNS[2:4]]
        lines.append("".join(cells + [f"{r[c]:>10.3f}" for c in METRIC_COLUMNS[4:]]))
    return "\n".join(lines)
