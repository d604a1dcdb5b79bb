"""`cdm-ood make-phantoms`: synthetic anatomical phantoms as DICOM series or NIfTI volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("make-phantoms")
@click.option("--out-dir", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The new or empty folder to write into.")  # fmt: skip
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of clean phantom volumes.")
@click.option(
    "--format", "fmt", required=True, help="dicom (series) or nifti (volumes): `cdm_ood.data.phantom_sets.FORMATS`."
)
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True, help="Rows and columns.")
@click.option("--slices", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per volume.")
@click.option("--modality", help="ct or mr (`cdm_ood.data.artifacts.MODALITIES`); default: ct, or mr for a brain.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of all randomness.")
@click.option(
    "--corrupt", is_flag=True, help="Also write 12 corrupted copies of each volume (6 artifacts x mild/strong)."
)
@click.option(
    "--ood-sets",
    is_flag=True,
    help="Also write, per volume, every artifact at the reject strength and every orientation error, and the "
    "wrong-modality files in OUT_DIR/wrong_modality (docs/data.md).",
)
@click.option(
    "--defects",
    is_flag=True,
    help="Also write, per volume, a copy with each local defect (metal streaks, lesion, foreign object, local "
    "ghost) and its mask as OUT_DIR/masks/<name>_mask.nii.gz, named in the manifest's mask column (docs/data.md).",
)
@click.option(
    "--anatomy",
    default="body",
    show_default=True,
    help="body (ellipse phantoms) or brain (MR subjects of the MNI152 template, NIfTI; needs cdm-ood[anatomy]).",
)
def make_phantoms_command(
    out: Path,
    n: int,
    fmt: str,
    size: int,
    slices: int,
    modality: Optional[str],
    seed: int,
    corrupt: bool,
    ood_sets: bool,
    defects: bool,
    anatomy: str,
) -> None:
    """Write N synthetic phantom volumes into the new or empty folder OUT_DIR, plus OUT_DIR/manifest.csv.

    DICOM volumes are series folders OUT_DIR/phantom_0000/slice_000.dcm, ...; NIfTI volumes are
    OUT_DIR/phantom_0000.nii.gz, .... CT values are Hounsfield units. With --anatomy brain the volumes are
    brain-MR subjects: the MNI152 template deformed, with a per-subject contrast, on a RAS grid of --size pixels
    over 220 mm and --slices axial slices over 150 mm. Everything is reproducible from --seed.
    `cdm-ood evaluate OUT_DIR/manifest.csv --ood OUT_DIR/manifest.csv` evaluates each OOD set.
    """
    from cdm_ood.data.phantom_sets import make_phantoms

    def report(done: int, total: int, path: str) -> None:
        click.echo(f"[{done}/{total}] {path}", err=True)

    try:
        manifest = make_phantoms(out, n, fmt, size, slices, modality, seed, corrupt, progress=report,
                                 ood_sets=ood_sets, anatomy=anatomy, defects=defects)  # fmt: skip
    except FileExistsError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"Manifest: {manifest}")
