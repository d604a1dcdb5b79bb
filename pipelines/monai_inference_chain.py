"""Insert the OOD check into a MONAI inference chain: scans the model was not trained for are set aside
before a downstream network sees them.

    python pipelines/monai_inference_chain.py --checkpoint runs/ct/model.pt scans/

`ScoreOODd` adds `image_ood_score` and `image_ood` to each sample inside an ordinary MONAI `Compose`
(followed here by the downstream model's own pre-processing); a stand-in downstream model (the mean of the
windowed image) then runs only on the in-distribution slices.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from monai.data import Dataset
from monai.transforms import Compose, ScaleIntensityRanged

from cdm_ood.data import iter_slices
from cdm_ood.ood import OODDetector, ScoreOODd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--detector", help="A calibrated detector (default: the checkpoint's calibrated default).")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    detector = OODDetector.from_checkpoint(args.checkpoint, detector=args.detector)
    samples = [{"image": s.image, "path": s.source.path, "slice": s.source.index}
               for s in iter_slices(args.paths, on_error=lambda e: print(f"skipped {e.path}: {e.reason}"))
               if not s.flags]  # fmt: skip
    chain = Compose([
        ScoreOODd("image", detector),  # on the image in its own units, before any other intensity change
        ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
    ])  # fmt: skip
    for sample in Dataset(samples, chain):
        status = "SET ASIDE (OOD)" if sample["image_ood"] else f"processed: {float(sample['image'].mean()):.3f}"
        print(f"{sample['path']} slice {sample['slice']}: score {sample['image_ood_score']:.3g} -> {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
