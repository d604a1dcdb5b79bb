"""bf16 against float32 scoring: each precision calibrated on the same in-distribution scans, every detector's AUROC
on the same test scans, how far bf16 moves the scores, and how many verdicts change.

    python benchmarks/precision.py --checkpoint runs/<run>/model.pt --calib DIR --test DIR/manifest.csv

`--test` is a `cdm-ood make-phantoms --corrupt` manifest: series with artifact `none` are in distribution, the
others OOD (slice level). For each precision (`cdm_ood.utils.precision.PRECISIONS`) the checkpoint's model is calibrated
on `--calib` in that precision (`OODDetector.fit`, as `cdm-ood calibrate --precision` does) and scores the test
slices. Prints the table block `score-precision`: per detector the AUROC in each precision, the largest change of a
slice's score when only the network's precision changes (float32 calibration, in units of the in-distribution test
scores' standard deviation), and the fraction of test slices whose verdict is the same under each precision's own
calibration and threshold. On a CPU, bf16 is emulated and says nothing about speed on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from tables import emit, markdown

from cdm_ood.data.volumes import iter_inputs
from cdm_ood.ood import OODDetector
from cdm_ood.ood.detectors import required_features
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.ood.report import judge
from cdm_ood.utils.precision import PRECISIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--calib", required=True, type=Path, help="In-distribution scans to calibrate on.")
    parser.add_argument("--test", required=True, type=Path, help="A make-phantoms --corrupt manifest.csv.")
    args = parser.parse_args()
    with open(args.test, newline="") as f:
        series = list(csv.DictReader(f))
    paths = [args.test.parent / s["path"] for s in series]
    slices = [list(iter_inputs(p, 2)) for p in paths]
    images = [s for group in slices for s in group]
    is_ood = np.array([s["artifact"] != "none" for s, group in zip(series, slices, strict=True) for _ in group])
    calibrated, features, seconds = {}, {}, {}
    for precision in PRECISIONS:
        detector = OODDetector.from_checkpoint(args.checkpoint).fit(args.calib, precision=precision)
        names = sorted(detector.model.calibration.detectors)
        calibrated[precision] = {name: OODDetector(detector.model, name) for name in names}
        start = time.perf_counter()
        features[precision] = detector.features(detector.prepare(images), required_features(names, None))
        seconds[precision] = (time.perf_counter() - start) / len(images)
    rows = []
    for name, a in calibrated["float32"].items():
        b = calibrated["bf16"][name]
        s32, s16 = a.score_features(features["float32"]), b.score_features(features["bf16"])
        moved = np.abs(a.score_features(features["bf16"]) - s32).max() / s32[~is_ood].std()
        same = np.mean([judge(x, a.threshold)[0] == judge(y, b.threshold)[0] for x, y in zip(s32, s16, strict=True)])
        auroc = [ood_metrics(s[~is_ood], s[is_ood])["auroc"] for s in (s32, s16)]
        rows.append([name, f"{auroc[0]:.3f}", f"{auroc[1]:.3f}", f"{moved:.3f}", f"{same:.3f}"])
    header = ["detector", "AUROC float32", "AUROC bf16", "largest move (in-dist. std)", "same verdict"]
    emit("score-precision", markdown(header, rows) + (
        f"\n\n{int((~is_ood).sum())} in-distribution and {int(is_ood.sum())} corrupted test slices of "
        f"{len(series)} series; each precision calibrated on `{args.calib.name}`. Features of every detector: "
        f"{1e3 * seconds['float32']:.1f} ms per slice in float32, {1e3 * seconds['bf16']:.1f} ms in bf16 "
        f"({torch.get_num_threads()} CPU threads: bf16 is emulated here, not a GPU timing)."
    ))  # fmt: skip


if __name__ == "__main__":
    main()
