"""A volume check on every path of the gate: a copy of the tiny CT test model calibrated on small brain subjects
(stored in CT-like units, so their background is air in its window), the CLI with the check on and off, the Python
API and `ScoreOODd`. Shared by the tests of the checks that read the images (anatomy) and the map (local)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from cdm_ood.data import iter_slices
from cdm_ood.data.anatomy import brain_affine, brain_volume
from cdm_ood.data.volume_files import write_nifti
from cdm_ood.integrations.serving import predict
from cdm_ood.ood import OODDetector, ScoreOODd


class BrainGate:
    """A model calibrated on 8 brain subjects of `size` pixels and `slices` slices drawn from `rng`; `write` stores a
    volume as the calibration subjects are stored."""

    def __init__(self, checkpoint: Path, folder: Path, size: int, slices: int, rng: np.random.Generator) -> None:
        from cli import main

        self.folder, self.size, self.slices, self.rng = folder, size, slices, rng
        self.model = folder / "model.pt"
        shutil.copy(checkpoint, self.model)
        for k in range(8):
            self.write(self.subject(), folder / "calibration" / f"subject_{k}.nii.gz")
        self.calibrated = CliRunner().invoke(main, ["calibrate", str(folder / "calibration"), "--checkpoint",
                                                    str(self.model)])  # fmt: skip
        assert self.calibrated.exit_code == 0, self.calibrated.output

    def subject(self) -> np.ndarray:
        return brain_volume(self.rng, self.size, self.slices)

    def write(self, volume: np.ndarray, path: Path) -> None:
        write_nifti(volume - 1000.0, path, affine=brain_affine(self.size, self.slices))

    def verdicts(
        self, scans: Path, checks: tuple[str, ...], flag: str, others: list[str], column: str, bad: str
    ) -> dict:
        """The volume verdicts and reasons by file name that `cdm-ood score` gives with the `checks` on (the CLI's
        `flag` turns them off in a second run), the others off by `others` and the detector's threshold out of
        reach; asserts that each slice row holds `column` when the checks are on, that with them off every volume
        passes, and that the Python API (checks on, off), `ScoreOODd` and the served model (on the file `bad`, sent
        as its bytes and as a stack of its slices) agree with the CLI."""
        from cli import main

        found = {}
        for off in (False, True):
            report = self.folder / f"report-{off}.csv"
            args = ["score", str(scans), "--checkpoint", str(self.model), "--threshold", "1e9", "--out", str(report),
                    *others, *([flag] if off else [])]  # fmt: skip
            CliRunner().invoke(main, args)
            with open(report, newline="") as f:
                rows = list(csv.DictReader(f))
            assert off or all(r[column] for r in rows if r["level"] == "slice"), column
            found[off] = {Path(r["path"]).name: (r["verdict"], r["reason"]) for r in rows if r["level"] == "volume"}
        assert {v for v, _ in found[True].values()} == {"in"}
        for off in (False, True):
            detector = OODDetector.from_checkpoint(self.model, threshold=1e9, volume_checks=() if off else checks)
            frame = detector.score_frame(scans)
            volumes = frame[frame.level == "volume"]
            assert volumes.verdict.tolist() == [found[off][Path(p).name][0] for p in volumes.path]
            chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScoreOODd("image", detector)])
            assert chain({"image": str(scans / bad)})["image_ood_verdict"] == found[off][bad][0]
            stack = np.stack([s.image for s in iter_slices(scans / bad)], axis=1)
            for request in ({"file": [(scans / bad).read_bytes()]}, {"volume": [stack]}):
                served = predict(detector, pd.DataFrame(request))
                assert served[served.level == "volume"][["verdict", "reason"]].values.tolist() == [[*found[off][bad]]]
        return found[False]
