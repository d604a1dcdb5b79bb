"""The files a scoring run writes: claimed before scoring (lock, writability), never scored themselves."""

import csv
import json
import locale
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from processes import WITHOUT_ROOT_OVERRIDE, cdm, clean_env
from test_score import invoke

from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.errors import UsageError
from cdm_ood.ood import outputs
from cdm_ood.ood.outputs import ReportBusyError, ReportFiles
from cdm_ood.utils.io import spreadsheet_safe, spreadsheet_value, write_csv_atomic


def slice_paths(report: Path) -> set[str]:
    with open(report, newline="") as f:
        return {r["path"] for r in csv.DictReader(f) if r["level"] in ("slice", "file")}


@pytest.mark.slow
def test_a_second_run_on_the_same_report_stops_and_the_first_completes(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    write_nifti(rng.normal(0, 100, (5000, 16, 16)).astype(np.float32), tmp_path / "long.nii.gz")
    report = tmp_path / "r.csv"
    args = ["score", tmp_path / "long.nii.gz", "--checkpoint", checkpoint, "--out", report]
    env = clean_env()
    command = [sys.executable, "-m", "cdm_ood.cli", *map(str, args), "--batch-size", "1", "--detector", "nll"]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = ReportFiles(report).lock
    deadline = time.time() + 120
    while not lock.exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = cdm(*args, cwd=tmp_path)
    assert first.poll() is None, "the first run must still be scoring when the second one starts"
    assert second.returncode == 2 and "another cdm-ood run is writing this report" in second.stderr
    assert "Traceback" not in second.stderr
    first.communicate(timeout=300)
    assert first.returncode in (0, 1)
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["level"] == "slice" for r in rows) == 5000, "the first run's report is whole"
    assert not lock.exists() and not ReportFiles(report).parts.exists()


def test_the_lock_is_released_and_taken_again(tmp_path):
    files = ReportFiles(tmp_path / "r.csv")
    with files.claimed():
        try:
            with ReportFiles(tmp_path / "r.csv").claimed():
                raise AssertionError("a second claim must fail while the first holds the lock")
        except ReportBusyError:
            pass
    with files.claimed():
        assert files.lock.exists()
    assert not files.lock.exists()


@pytest.mark.slow
def test_a_forked_reader_outliving_a_killed_run_does_not_hold_its_report(tmp_path):
    """A run holding the lock forks a child (as DataLoader workers are) and is killed; the child lives on, and a
    new run takes the report at once."""
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from cdm_ood.ood.outputs import ReportFiles\n"
        "with ReportFiles(Path(sys.argv[1])).claimed():\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.csv")])
    assert killed.returncode == -signal.SIGKILL and ReportFiles(tmp_path / "r.csv").lock.exists()
    with ReportFiles(tmp_path / "r.csv").claimed():
        pass


def test_a_report_inside_the_scanned_folder_never_scores_its_own_outputs(checkpoint, scans, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("clean.nii.gz", "spiked.nii.gz"):
        (folder / name).write_bytes((scans / name).read_bytes())
    for _ in range(2):
        out = invoke("score", folder, "--checkpoint", checkpoint, "--out", folder / "r.csv", "--no-fail")
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout.splitlines()[-1]).get("file_unreadable", 0) == 0
    assert slice_paths(folder / "r.csv") == {str(folder / "clean.nii.gz"), str(folder / "spiked.nii.gz")}
    assert sorted(p.name for p in folder.iterdir()) == [
        "clean.nii.gz", "r.csv", "r.previous.csv", "r_hist.png", "r_hist.previous.png", "spiked.nii.gz",
    ], "the first run's outputs moved aside by the second, which scores none of them"  # fmt: skip


@pytest.mark.slow
def test_an_unwritable_report_folder_stops_before_any_scoring(checkpoint, scans, tmp_path):
    locked = tmp_path / "reports"
    locked.mkdir(mode=0o555)
    out = cdm("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--out", locked / "r.csv", cwd=tmp_path,
              prefix=WITHOUT_ROOT_OVERRIDE)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot write into" in out.stderr and "Permission denied" in out.stderr and "Traceback" not in out.stderr
    assert "scoring" not in out.stderr and list(locked.iterdir()) == []


@pytest.mark.slow
def test_a_read_only_filesystem_stops_before_any_scoring(checkpoint, scans, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    command = [sys.executable, "-m", "cdm_ood.cli", "score", str(scans / "clean.nii.gz"), "--checkpoint",
               str(checkpoint), "--out", str(mount / "r.csv")]  # fmt: skip
    namespace = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]  # a mount of this process alone
    script = f'mount -t tmpfs -o ro tmpfs "{mount}" && exec "$@"'
    out = subprocess.run([*namespace, "sh", "-c", script, "sh", *command], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Read-only file system" in out.stderr and "Traceback" not in out.stderr


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_header_text_that_a_spreadsheet_would_run_is_neutralised_in_the_csv(checkpoint, tmp_path):
    series = tmp_path / "in" / "=series"
    write_dicom_series(phantom_volume(np.random.default_rng(2), size=16, slices=2), series, modality="ct",
                       volume_index=0)  # fmt: skip
    hostile = ['=HYPERLINK("http://example.invalid","x")', "@SUM(1+1)"]
    for path, uid in zip(sorted(series.iterdir()), hostile, strict=True):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = "+1.2.3", uid
        ds.save_as(path)
    out = invoke("score", tmp_path / "in", "--checkpoint", checkpoint, "--threshold", "-1e12", "--out",
                 tmp_path / "r.csv")  # fmt: skip
    assert out.exit_code == 1, out.output  # a threshold below every score: every slice ood, scores negative or not
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = [cell for row in rows for cell in row.values()]
    text = [c for c in cells if c and not is_number(c)]
    assert not [c for c in text if c[0] in "=+-@\t\r"], "no text cell starts a formula"
    assert {row["sop_instance_uid"] for row in rows if row["level"] == "slice"} == {f"'{uid}" for uid in hostile}
    assert {row["volume"] for row in rows} == {"'+1.2.3"}
    assert float(rows[0]["threshold"]) == -1e12, "numbers stay numbers"
    assert {spreadsheet_value(row["volume"]) for row in rows} == {"+1.2.3"}


def test_a_lock_file_removed_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    """Another run that ends (and removes the lock file) between this run's open and its lock leaves this run
    locking a file nobody else can see: the lock is taken again on the file now at the lock's path, and the
    descriptor of the removed one is closed."""
    files = ReportFiles(tmp_path / "r.csv")
    flock, taken = outputs.fcntl.flock, []

    def removed_after_the_first_lock(fd: int, operation: int) -> None:
        flock(fd, operation)
        taken.append(fd)
        if len(taken) == 1:
            files.lock.unlink()

    monkeypatch.setattr(outputs.fcntl, "flock", removed_after_the_first_lock)
    with files.claimed():
        (held,) = outputs._HELD
        assert len(taken) == 2 and held == taken[1]
        assert os.fstat(held).st_ino == os.stat(files.lock).st_ino
        if taken[0] != held:  # the number may be reused by the second open
            with pytest.raises(OSError):
                os.fstat(taken[0])


def test_dropping_inherited_locks_closes_every_listed_descriptor_and_forgets_it(tmp_path, monkeypatch):
    """What a forked child runs first (`os.register_at_fork`), run here: mutmut records no call in a child."""
    fds = {os.open(tmp_path / name, os.O_CREAT | os.O_RDWR) for name in ("a", "b")}
    monkeypatch.setattr(outputs, "_HELD", set(fds))
    outputs._drop_inherited_locks()
    assert not outputs._HELD
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_forked_child_closes_the_inherited_lock_descriptor(tmp_path):
    """In a child forked while the report is claimed (a DataLoader worker), the lock's descriptor is closed at once
    and the child holds no lock of its own."""
    with ReportFiles(tmp_path / "r.csv").claimed():
        (fd,) = outputs._HELD
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only when the descriptor is closed and no lock is listed as held
            try:
                os.fstat(fd)
            except OSError:
                os._exit(1 if outputs._HELD else 0)
            os._exit(2)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        os.fstat(fd)  # the parent's descriptor stays open


@pytest.mark.parametrize(
    "value, cell",
    [("=1+1", "'=1+1"), ("+1.2.3", "'+1.2.3"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"),
     ("\rx", "'\rx"), ("plain", "plain"), ("'quoted", "'quoted"), ("", ""), ("a=b", "a=b"), ("'=x", "''=x"),
     ("''+y", "'''+y"), ("'", "'"), ("X=1", "X=1")],
)  # fmt: skip
def test_spreadsheet_safe_prefixes_formula_text_and_spreadsheet_value_undoes_exactly_that(value, cell):
    assert spreadsheet_safe(value) == cell
    assert spreadsheet_value(cell) == value


@pytest.mark.parametrize("value", [-1.5, 0, None, 3])
def test_spreadsheet_safe_leaves_numbers_and_empty_cells_alone(value):
    assert spreadsheet_safe(value) is value


def test_a_run_owns_its_report_files_in_the_report_folder_only(tmp_path):
    files = ReportFiles(tmp_path / "r.csv")
    owned = ["r.csv", "r_hist.png", "r.previous.csv", "r_hist.previous.png", ".r.csv.lock", ".r.csv.parts",
             ".r.csv.123.abcd.tmp", ".r_hist.png.9.tmp", ".r.previous.csv.1.tmp"]  # fmt: skip
    others = ["s.csv", "r.csv.bak", "xr.csv", ".r.csvx", "r_hist.jpg", "r.previous", ".r.csv", "r.json"]
    assert [n for n in owned + others if files.owns(tmp_path / n)] == owned
    (tmp_path / "sub").mkdir()
    assert not files.owns(tmp_path / "sub" / "r.csv") and files.owns(tmp_path / "sub" / ".." / "r.csv")
    assert (files.histogram, files.parts, files.lock) == (tmp_path / "r_hist.png", tmp_path / ".r.csv.parts",
                                                           tmp_path / ".r.csv.lock")  # fmt: skip


def test_move_aside_renames_what_an_earlier_run_left_and_says_what_it_cannot(tmp_path):
    files = ReportFiles(tmp_path / "r.csv")
    assert files.move_aside() == []
    (tmp_path / "r_hist.png").write_bytes(b"old histogram")  # the report itself is gone: the histogram still moves
    assert files.move_aside() == [tmp_path / "r_hist.previous.png"]
    assert (tmp_path / "r_hist.previous.png").read_bytes() == b"old histogram"
    (tmp_path / "r.csv").write_text("old report")
    (tmp_path / "r_hist.png").write_bytes(b"newer histogram")
    assert files.move_aside() == [tmp_path / "r.previous.csv", tmp_path / "r_hist.previous.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.previous.csv", "r_hist.previous.png"]
    (tmp_path / "r.csv").write_text("report")
    (tmp_path / "r.previous.csv").unlink()
    (tmp_path / "r.previous.csv").mkdir()
    (tmp_path / "r.previous.csv" / "x").write_text("a folder in the way")
    with pytest.raises(UsageError) as err:
        files.move_aside()
    assert str(err.value) == (f"--out {tmp_path / 'r.csv'}: cannot move the previous run's r.csv aside (Is a "
                              "directory); nothing was scored")  # fmt: skip


def test_the_lock_file_is_created_rw_r_r_and_a_busy_report_names_it(tmp_path):
    files = ReportFiles(tmp_path / "r.csv")
    umask = os.umask(0o022)
    try:
        with files.claimed():
            assert files.lock.stat().st_mode & 0o777 == 0o644
            with pytest.raises(ReportBusyError) as err:
                ReportFiles(tmp_path / "r.csv")._lock()
    finally:
        os.umask(umask)
    assert str(err.value) == (f"--out {files.report}: another cdm-ood run is writing this report (lock {files.lock}); "
                              "wait for it to finish or choose another --out")  # fmt: skip


@contextmanager
def c_locale() -> Iterator[None]:
    """The C locale (ASCII) for text files opened without an encoding, as on a bare server."""
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


def test_write_csv_atomic_writes_utf8_with_exact_name_bytes_and_neutralises_formulas_only_for_people(tmp_path):
    """UTF-8 whatever the locale, a non-UTF-8 name's own bytes, CSV line ends; `for_people` only adds the quote."""
    rows = [{"name": "caf\udce9=\u00e9", "value": "=1+1"}, {"name": "a\nb", "value": -2.5}]
    with c_locale():
        write_csv_atomic(tmp_path / "raw.csv", ["name", "value"], rows)
        write_csv_atomic(tmp_path / "people.csv", ("name", "value"), rows, for_people=True)
    head = b"name,value\r\ncaf\xe9=\xc3\xa9,"
    assert (tmp_path / "raw.csv").read_bytes() == head + b'=1+1\r\n"a\nb",-2.5\r\n'
    assert (tmp_path / "people.csv").read_bytes() == head + b'\'=1+1\r\n"a\nb",-2.5\r\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["people.csv", "raw.csv"], "no temporary file left"
