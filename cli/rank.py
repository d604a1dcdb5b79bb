"""`cdm-ood rank-restorations`: order candidate restorations of a degraded scan by plausibility."""

from __future__ import annotations

import csv
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import click

from cdm_ood.errors import UsageError

from .common import checkpoint_option, open_checkpoint, setup_logging

COLUMNS = ("case", "rank", "candidate", "criterion", "score", "log_prior", "log_observation", "error")


class CaseError(Exception):
    """A case that cannot be ranked (unreadable file, shape or preset mismatch), with the files named."""


def operator_for(spec: str):
    """`noise` (the identity) or `blur:<px>` (Gaussian blur with that std in pixels, MONAI's GaussianFilter)."""
    if spec == "noise":
        return None
    kind, _, value = spec.partition(":")
    if kind == "blur":
        from monai.networks.layers import GaussianFilter

        try:
            return GaussianFilter(spatial_dims=2, sigma=float(value))
        except ValueError:
            pass
    raise click.BadParameter(f"{spec!r}: expected 'noise' or 'blur:<std in pixels>'", param_hint="--degradation")


def load_images(model: Any, paths: list[Path]):
    """The model-space images of single-slice files, which must share raw shape and format (hence preset)."""
    import torch

    from cdm_ood.data import read_file
    from cdm_ood.data.errors import DataError
    from cdm_ood.data.readers import detect_format

    transform = model.spec.input_transform()
    images, shapes, formats = [], {}, {}
    for path in paths:
        try:
            slices = read_file(path)
            formats[path] = detect_format(path)
        except DataError as err:
            raise CaseError(f"{err.path}: {err.reason}") from None
        if len(slices) != 1:
            raise CaseError(f"{path}: holds {len(slices)} slices; give one 2D image per file")
        if slices[0].flags:
            raise CaseError(f"{path}: {', '.join(slices[0].flags)} pixels")
        shapes[path] = slices[0].image.shape
        images.append(transform(slices[0].image))
    for label, values in (("shape", shapes), ("format (and so intensity preset)", formats)):
        if len(set(values.values())) > 1:
            first = paths[0]
            other = next(p for p in paths if values[p] != values[first])
            raise CaseError(f"{label} mismatch: {first} is {values[first]} but {other} is {values[other]}")
    return torch.stack(images)


def rank_case(
    model: Any, case: str, observed: Optional[Path], candidates: list[Path], criterion: str, sigma: Optional[float],
    degradation: str, generate: int, steps: int, seed: int, out_dir: Path,
) -> list[dict]:  # fmt: skip
    """Ranking rows (best first) of one case; with `generate`, K candidates made by the CDM are added first."""
    import numpy as np
    import torch

    from cdm_ood.figures import save_png, to_uint8
    from cdm_ood.io import atomic_path
    from cdm_ood.ranking import rank_restorations
    from cdm_ood.sampling import denoise

    paths = ([observed] if observed else []) + candidates
    x = load_images(model, paths) if paths else None
    y = x[:1] if observed else None
    cands, names = (x[1:] if observed else x), [str(p) for p in candidates]
    if generate:
        if y is None or sigma is None or degradation != "noise":
            raise CaseError("--generate needs --observed, --sigma and the 'noise' degradation")
        g = torch.Generator().manual_seed(seed)
        made = [denoise(model.classifier, y, model.schedule, sigma)]
        made += [denoise(model.classifier, y, model.schedule, sigma, method="ddpm", steps=steps, generator=g)
                 for _ in range(generate - 1)]  # fmt: skip
        made = torch.cat(made).clamp(-1, 1)
        for i, image in enumerate(made):
            name = out_dir / f"{case}_generated_{i}"
            save_png(to_uint8(image[None])[0, 0], name.with_suffix(".png"))
            with atomic_path(name.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, model.spec.preset.inverse(image.numpy()))
        names = [str(out_dir / f"{case}_generated_{i}.npy") for i in range(len(made))] + names
        cands = made if cands is None or len(cands) == 0 else torch.cat([made, cands])
    if cands is None or len(cands) == 0:
        raise CaseError("no candidates to rank")
    try:
        ranking = rank_restorations(model.classifier, model.schedule, cands, y, criterion, sigma,
                                    operator_for(degradation))  # fmt: skip
    except ValueError as err:
        raise CaseError(str(err)) from None
    rows = []
    for rank, i in enumerate(ranking.order, start=1):
        rows.append({
            "case": case, "rank": rank, "candidate": names[i], "criterion": criterion,
            "score": ranking.scores[i].item(),
            "log_prior": None if ranking.log_prior is None else ranking.log_prior[i].item(),
            "log_observation": None if ranking.log_observation is None else ranking.log_observation[i].item(),
            "error": "",
        })  # fmt: skip
    return rows


@click.command("rank-restorations")
@click.argument("candidates", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@checkpoint_option
@click.option("--observed", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The degraded scan.")
@click.option("--criterion", default="map", show_default=True, help="One of `cdm_ood.ranking.CRITERIA`.")
@click.option("--sigma", type=float, help="Noise std (model units, data in [-1, 1]) of the observation (map) "
              "or of the candidates (noisy-level).")  # fmt: skip
@click.option("--degradation", default="noise", show_default=True, help="noise, or blur:<std in pixels>.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV: case, observed, candidates (';'-separated), optional degradation and sigma.")  # fmt: skip
@click.option("--generate", default=0, show_default=True, help="Also make K candidates with the CDM denoiser "
              "(1 MMSE estimate + K-1 posterior samples) and rank them too.")  # fmt: skip
@click.option("--steps", default=50, show_default=True, help="Sampler steps for --generate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("ranking.csv"), show_default=True)
def rank_restorations_command(
    candidates: tuple[Path, ...], checkpoint: Path, observed: Optional[Path], criterion: str, sigma: Optional[float],
    degradation: str, manifest: Optional[Path], generate: int, steps: int, seed: int, out: Path,
) -> None:  # fmt: skip
    """Rank candidate restorations (DICOM, NIfTI or PNG files of one slice each) of a degraded scan.

    Criteria: prior = log p_0(x); map = log p_0(x) + log N(y; A x, sigma^2) (the posterior; prior alone favours
    over-smoothed candidates); noisy-level = the exact density of candidates that are noisy with std sigma.
    Prints and writes the ranking (best first). Exit 1 when a manifest case could not be ranked, 2 on errors.
    """
    from cdm_ood.io import write_csv_atomic
    from cdm_ood.ranking import CRITERIA

    setup_logging()
    if criterion not in CRITERIA:
        raise UsageError(f"--criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    model = open_checkpoint(checkpoint)
    if manifest is None:
        cases = [("case", observed, list(candidates), degradation, sigma)]
    else:
        cases = read_manifest(manifest, degradation, sigma)
    out_dir = out.with_name(f"{out.stem}_generated")
    rows, failed = [], 0
    bar = click.progressbar(cases, label="ranking", file=sys.stderr) if manifest else nullcontext(cases)
    with bar as items:
        for case, obs, cands, deg, sig in items:
            try:
                rows += rank_case(model, case, obs, cands, criterion, sig, deg, generate, steps, seed, out_dir)
            except CaseError as err:
                if manifest is None:
                    raise UsageError(str(err)) from None
                failed += 1
                rows.append(dict.fromkeys(COLUMNS, "") | {"case": case, "criterion": criterion, "error": str(err)})
    write_csv_atomic(out, COLUMNS, [{k: "" if r[k] is None else r[k] for k in COLUMNS} for r in rows])
    for r in rows:
        if r["error"]:
            click.echo(f"{r['case']}: not ranked: {r['error']}")
        else:
            click.echo(f"{r['case']} #{r['rank']} {r['score']:.2f} {r['candidate']}")
    click.echo(f"ranking: {out}")
    sys.exit(1 if failed else 0)


def read_manifest(path: Path, degradation: str, sigma: Optional[float]) -> list[tuple]:
    """Cases from a manifest CSV; relative file paths are relative to the manifest's folder."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case", "observed", "candidates"} - set(reader.fieldnames or ())
        if missing:
            raise click.BadParameter(f"{path}: missing columns {sorted(missing)}", param_hint="--manifest")
        cases = []
        for row in reader:

            def resolve(p: str) -> Path:
                return (path.parent / p.strip()) if not Path(p.strip()).is_absolute() else Path(p.strip())

            cases.append((
                row["case"], resolve(row["observed"]) if row["observed"].strip() else None,
                [resolve(p) for p in row["candidates"].split(";") if p.strip()],
                (row.get("degradation") or "").strip() or degradation,
                float(row["sigma"]) if (row.get("sigma") or "").strip() else sigma,
            ))  # fmt: skip
    return cases
