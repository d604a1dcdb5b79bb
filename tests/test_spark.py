"""Scoring on Spark (`cdm_ood.integrations.spark.score_files`) in a real local Spark session: the rows of
`cdm-ood score`."""

import json
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import pytest
from processes import cdm

from cdm_ood.errors import CdmOodError, MissingExtraError, UsageError
from cdm_ood.integrations.spark import score_files
from cdm_ood.ood.report import COLUMNS


def java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    return shutil.which("java") or (home and shutil.which("java", path=str(Path(home) / "bin")))


@pytest.fixture(scope="module")
def spark():
    if not java():
        pytest.skip("no Java runtime (no `java` on PATH or in $JAVA_HOME/bin): Spark cannot start")
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter, where cdm-ood is installed
        session = (
            SparkSession.builder.master("local[2]").appName("cdm-ood-tests").config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "2").config("spark.driver.memory", "512m").getOrCreate()
        )  # fmt: skip
        session.sparkContext.setLogLevel("ERROR")
        yield session
        session.stop()


def by_slice(rows: list[dict], local=str) -> dict[tuple, dict]:
    """Report rows keyed by (level, path, slice, time point), with paths (and path-named volumes) as local paths."""
    rows = [r | {k: r[k] and local(r[k]) for k in ("path", "volume")} for r in rows]
    keyed = {(r["level"], r["path"], r["slice"], r["time_point"]): r for r in rows}
    assert len(keyed) == len(rows), "one row per slice, file and volume"
    return keyed


def from_uri(value: str) -> str:
    return urlsplit(value).path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # pyspark 4 on pandas 3
def test_spark_gives_the_rows_of_cdm_ood_score_for_paths_and_binary_files(spark, checkpoint, scans, tmp_path):
    folder = Path(shutil.copytree(scans, tmp_path / "scans"))  # and a NIfTI .hdr/.img pair: two files, one volume
    volume = nib.load(folder / "clean.nii.gz")
    nib.save(nib.Nifti1Pair(volume.get_fdata(dtype=np.float32), volume.affine), folder / "pair.hdr")
    out = cdm("score", folder, "--checkpoint", checkpoint, "--out", tmp_path / "report.json", "--no-fail", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = by_slice(json.loads((tmp_path / "report.json").read_text())["rows"])
    assert {r["verdict"] for r in expected.values()} >= {"in", "ood", "flagged", "unreadable"}

    # the example of docs/scaling.md
    paths = spark.createDataFrame([(str(p),) for p in sorted(folder.rglob("*")) if p.is_file()], "path string")
    binary = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder))
    for files, local in ((paths, str), (binary, from_uri)):
        report = score_files(files, checkpoint)
        assert report.columns == list(COLUMNS)
        rows = by_slice([r.asDict() for r in report.collect()], local)
        assert rows.keys() == expected.keys()
        for key, row in rows.items():
            want = expected[key]["score"]
            assert row["score"] == (want if want is None else pytest.approx(want, rel=1e-5)), key
            assert {k: v for k, v in row.items() if k != "score"} == {
                k: v for k, v in expected[key].items() if k != "score"
            }, key


def test_an_unusable_threshold_stops_on_the_driver(spark, checkpoint):
    files = spark.createDataFrame([("unread.dcm",)], "path string")
    with pytest.raises(UsageError, match="false-positive rate"):
        score_files(files, checkpoint, threshold="fpr:x")


def test_without_pyspark_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # as if not installed: `import pyspark` fails
    with pytest.raises(MissingExtraError, match=r"pip install 'cdm-ood\[spark\]'") as err:
        score_files(None, "model.pt")
    assert isinstance(err.value, CdmOodError) and isinstance(err.value, ImportError)
