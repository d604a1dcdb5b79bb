"""Archive-scale scoring: torchrun-sharded `cdm-ood score` (real gloo processes) and resuming a killed run, which
rescores what changed, drops what vanished and refuses another run's parts."""

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from processes import cdm, clean_env
from test_outputs import c_locale

from cdm_ood import OODDetector
from cdm_ood.data.errors import UnreadableFileError
from cdm_ood.data.guards import MAX_VOXELS
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.records import SliceSource
from cdm_ood.data.walk import IgnoredFile
from cdm_ood.errors import UsageError
from cdm_ood.model.checkpoint import load_checkpoint, save_checkpoint
from cdm_ood.ood.batch import report_rows
from cdm_ood.ood.gate import run_identity
from cdm_ood.ood.report import AGGREGATES, COLUMNS, error_row, slice_row
from cdm_ood.ood.shards import (
    PART_COLUMNS,
    clear,
    file_key,
    merge,
    plan_shard,
    read_parts,
    score_into_parts,
    start_parts,
    write_part,
)
from cdm_ood.ood.thresholds import Thresholds


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """12 DICOM series of 6 slices (72 files) and one unreadable file."""
    folder = tmp_path_factory.mktemp("archive") / "dicom"
    make_phantoms(folder, 12, "dicom", size=16, slices=6, seed=3)  # its manifest.csv is ignored by name
    (folder / "junk.bin").write_bytes(bytes(range(256)))
    return folder


def score(*args, cwd: Path, runner=(), wait=True):
    env = clean_env({"OMP_NUM_THREADS": "1"})
    command = [sys.executable, *runner, "-m", "cdm_ood.cli", "score", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def rows(report: Path) -> list[dict]:
    with open(report, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["level"], r["path"], r["slice"], r["volume"]))


def same_report(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, scores to float32 batch-composition noise."""
    exact = [{k: v for k, v in r.items() if k != "score"} for r in a] == [
        {k: v for k, v in r.items() if k != "score"} for r in b
    ]
    scores = [(float(x["score"] or "nan"), float(y["score"] or "nan")) for x, y in zip(a, b, strict=True)]
    return exact and all(x == pytest.approx(y, rel=1e-5, nan_ok=True) for x, y in scores)


def torchrun(n: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip


@pytest.mark.slow
def test_two_torchrun_processes_give_the_single_process_report(checkpoint, archive, tmp_path):
    one = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "one.csv", "--no-fail", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "two.csv", "--no-fail", cwd=tmp_path,
                runner=torchrun(2))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, merged = rows(tmp_path / "one.csv"), rows(tmp_path / "two.csv")
    assert len(single) == 74 + 12 and same_report(merged, single), "every file exactly once, same scores and verdicts"
    assert not list(tmp_path.glob(".*.parts")), "partial reports are removed after the merge"


@pytest.mark.slow
def test_a_killed_run_resumes_without_rescoring_or_duplicates(checkpoint, archive, tmp_path):
    reference = score(archive, "--checkpoint", checkpoint, "--out", tmp_path / "ref.csv", "--batch-size", 1,
                      "--no-fail", cwd=tmp_path)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "report.csv"
    parts = tmp_path / ".report.csv.parts"
    job = score(archive, "--checkpoint", checkpoint, "--out", out, "--batch-size", 1, "--no-fail", cwd=tmp_path,
                wait=False)  # fmt: skip
    deadline = time.time() + 120
    while len(list(parts.glob("rank*.csv"))) < 3 and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not out.exists() and len(list(parts.glob("rank*.csv"))) >= 3, "killed after some parts, before the merge"
    resumed = score(archive, "--checkpoint", checkpoint, "--out", out, "--batch-size", 1, "--resume", "--no-fail",
                    cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped = int(resumed.stderr.split(" files already scored")[0].rsplit(" ", 1)[-1])
    assert 3 <= skipped < 72, "the finished files were not scored again"
    assert rows(out) == rows(tmp_path / "ref.csv"), "the full report, no duplicate rows"


@pytest.fixture()
def interrupted(checkpoint, tmp_path) -> tuple[Path, Path]:
    """An incoming folder of two clean NIfTI volumes (uncompressed: rewriting one keeps its size) in two study
    folders, and the partial reports of a run over it that stopped after scoring them, as `cdm-ood score` leaves
    them (the same identity, plan and writer); returns (folder, report)."""
    folder, report = tmp_path / "incoming", tmp_path / "report.csv"
    rng = np.random.default_rng(5)
    for study in ("a", "b"):
        write_raw_nifti(phantom_volume(rng, size=16, slices=4), folder / study / "scan.nii")
    detector = OODDetector.from_checkpoint(checkpoint)
    parts = tmp_path / ".report.csv.parts"
    start_parts(parts, run_identity(detector, detector.thresholds, MAX_VOXELS, None), resume=False)
    plan = plan_shard([folder], parts, 0, 1, resume=False)
    score_into_parts(detector, detector.thresholds, plan.todo, plan.failed, parts, 0)
    return folder, report


def write_raw_nifti(volume: np.ndarray, path: Path) -> None:
    """An uncompressed float32 NIfTI: the same shape always gives the same file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), np.eye(4)), path)


def volume_verdicts(report: Path) -> dict[str, str]:
    return {Path(r["path"]).parent.name: r["verdict"] for r in rows(report) if r["level"] == "volume"}


@pytest.mark.slow
def test_resume_rescores_a_file_rewritten_with_the_same_size_and_times(checkpoint, interrupted, tmp_path):
    folder, report = interrupted
    scan = folder / "a" / "scan.nii"
    before = os.stat(scan)
    broken = phantom_volume(np.random.default_rng(5), size=16, slices=4)
    broken[1, 3:5, 3:5] = np.nan  # content the gate cannot judge: flagged once it is read
    write_raw_nifti(broken, tmp_path / "restored.nii")
    subprocess.run(["touch", "-r", scan, tmp_path / "restored.nii"], check=True)
    subprocess.run(["cp", "-p", tmp_path / "restored.nii", scan], check=True)  # a restore that keeps the time stamps
    after = os.stat(scan)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    resumed = cdm("score", folder, "--checkpoint", checkpoint, "--out", report, "--resume", "--no-fail", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 files already scored" in resumed.stderr, "b is unchanged and kept; a is scored again"
    verdicts = volume_verdicts(report)
    assert verdicts["a"] == "flagged" and verdicts["b"] in ("in", "ood")


@pytest.mark.slow
def test_resume_drops_the_rows_of_a_folder_deleted_since(checkpoint, interrupted, tmp_path):
    folder, report = interrupted
    shutil.rmtree(folder / "b")
    resumed = cdm("score", folder, "--checkpoint", checkpoint, "--out", report, "--resume", "--no-fail", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {Path(r["path"]).parent.name for r in rows(report)} == {"a"}
    assert "no longer among the inputs" in resumed.stderr


@pytest.mark.parametrize("option", [("--detector", "nll"), ("--threshold", "fpr:0.5"), ("--max-voxels", 10**6)])
def test_resume_refuses_the_parts_of_another_run(checkpoint, interrupted, tmp_path, option):
    folder, report = interrupted
    resumed = cdm("score", folder, "--checkpoint", checkpoint, "--out", report, "--resume", *option, cwd=tmp_path)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    (line,) = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert "--resume" in line and "another run" in line and "Traceback" not in resumed.stderr
    assert not report.exists() and list((tmp_path / ".report.csv.parts").glob("rank*.csv")), "the parts stay"


@pytest.mark.slow
def test_resume_refuses_the_parts_of_another_checkpoint(checkpoint, interrupted, tmp_path):
    folder, report = interrupted
    other = tmp_path / "other.pt"
    save_checkpoint(other, load_checkpoint(checkpoint) | {"step": 41})  # same weights and calibration, new content
    resumed = cdm("score", folder, "--checkpoint", other, "--out", report, "--resume", cwd=tmp_path)
    assert resumed.returncode == 2 and "checkpoint_digest differ" in resumed.stderr, resumed.stderr[-2000:]
    same = cdm("score", folder, "--checkpoint", checkpoint, "--out", report, "--resume", "--no-fail", cwd=tmp_path)
    assert same.returncode == 0 and "2 files already scored" in same.stderr, "the parts stayed for their own run"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "reader killed"])
def test_a_run_that_cannot_finish_exits_3_with_one_error_line(checkpoint, archive, tmp_path, stop):
    out = tmp_path / "report.csv"
    out.write_text("level,path\nvolume,an earlier run's row\n")
    parts = tmp_path / ".report.csv.parts"
    job = score(archive, "--checkpoint", checkpoint, "--out", out, "--batch-size", 1, "--workers", 1, cwd=tmp_path,
                wait=False)  # fmt: skip
    deadline = time.time() + 120
    while len(list(parts.glob("rank*.csv"))) < 3 and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the unreadable file's row, then two scored files: the reader process is running
    if stop == "reader killed":
        os.kill(children(job.pid)[0], signal.SIGKILL)
    else:
        job.send_signal(getattr(signal, stop))
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 3, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr and "Aborted!" not in stderr, stderr[-2000:]
    assert {"SIGINT": "interrupted", "SIGTERM": "terminated", "reader killed": "DataLoader worker"}[stop] in errors[0]
    assert not out.exists(), "no report, and the earlier run's is not where this run's would be"
    assert "an earlier run's row" in (tmp_path / "report.previous.csv").read_text()


@pytest.mark.slow
def test_a_full_disk_exits_3_with_one_error_line(checkpoint, scans, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 64 KiB file system of its own (a private mount namespace: gone with the process), filled up after an
    # earlier run's report was written to it
    fill = (f"mount -t tmpfs -o size=64k tmpfs {disk} && echo old > {disk}/r.csv && "
            f"(cat /dev/zero > {disk}/fill 2>/dev/null; true) && \"$@\"; status=$?; ls {disk} >&2; "
            "exit $status")  # fmt: skip
    out = cdm("score", scans, "--checkpoint", checkpoint, "--out", disk / "r.csv", cwd=tmp_path,
              prefix=("unshare", "--mount", "sh", "-c", fill, "sh"))  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in out.stderr
    listing = out.stderr.splitlines()[-4:]
    assert "r.previous.csv" in listing and "r.csv" not in listing, listing


def content_rows(path: Path, volume: str, thresholds: Thresholds) -> list[dict]:
    """Stand-in for scoring a file, no model needed: two slice rows whose scores are a hash of the file's content
    (a file rewritten with other content scores otherwise)."""
    digest = hashlib.blake2b(path.read_bytes(), digest_size=4).digest()
    return [slice_row(SliceSource(str(path), k, volume), float(digest[2 * k] * 256 + digest[2 * k + 1]),
                      thresholds.score) for k in range(2)]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=8), st.data())
def test_partial_reports_of_any_sizes_merge_to_the_unsharded_report(contents, data):
    """However the files are cut into partial reports (any number, any sizes, any ranks, any order), the merged
    report is the one scoring them all at once gives."""
    thresholds = Thresholds(32768.0)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"f{k}" for k in range(len(contents))]
        for path, content in zip(files, contents, strict=True):
            path.write_bytes(content)
        volumes = data.draw(st.lists(st.sampled_from("abc"), min_size=len(files), max_size=len(files)))
        rows = {path: content_rows(path, volume, thresholds) for path, volume in zip(files, volumes, strict=True)}
        part = data.draw(st.lists(st.integers(0, 3), min_size=len(files), max_size=len(files)))
        parts = Path(tmp) / "parts"
        parts.mkdir()
        for p in sorted(set(part)):
            write_part(parts, data.draw(st.integers(0, 7)), [r for f, k in zip(files, part, strict=True) if k == p
                                                             for r in rows[f]])  # fmt: skip
        for how in AGGREGATES:
            assert merge(parts, thresholds, how) == report_rows([r for f in files for r in rows[f]], thresholds, how)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.data())
def test_resume_after_any_files_changed_deleted_or_added_equals_a_fresh_run(n, data):
    """A resumed run plans exactly the files that are new or whose content changed, and its merged report (old
    parts plus the rows of what it scored) is the report of a fresh run over the files as they are now."""
    thresholds = Thresholds(32768.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, parts = Path(tmp) / "in", Path(tmp) / "parts"
        folder.mkdir()
        png = [folder / f"s{k}.png" for k in range(n)]
        for k, path in enumerate(png):
            write_png(path, k)
        plan = plan_shard([folder], parts, 0, 1, resume=False)
        write_part(parts, 0, [r for s in plan.todo for r in content_rows(Path(s.path), s.volume_id, thresholds)])
        changed = data.draw(st.sets(st.sampled_from(png)))
        deleted = data.draw(st.sets(st.sampled_from(png))) - changed
        added = [folder / f"new{k}.png" for k in range(data.draw(st.integers(0, 2)))]
        for k, path in enumerate(sorted(changed)):
            write_png(path, 100 + k)
        for path in deleted:
            path.unlink()
        for k, path in enumerate(added):
            write_png(path, 200 + k)
        plan = plan_shard([folder], parts, 0, 1, resume=True)
        assert {Path(s.path) for s in plan.todo} == changed | set(added)
        assert plan.skipped == n - len(changed) - len(deleted)
        write_part(parts, 0, [r for s in plan.todo for r in content_rows(Path(s.path), s.volume_id, thresholds)])
        fresh = plan_shard([folder], Path(tmp) / "none", 0, 1, resume=False)
        expected = [r for s in fresh.todo for r in content_rows(Path(s.path), s.volume_id, thresholds)]
        assert merge(parts, thresholds, "mean", plan.current) == report_rows(expected, thresholds, "mean")


def write_png(path: Path, seed: int) -> None:
    """A 4 x 4 grey PNG whose pixels (and bytes) differ with `seed`."""
    pixels = np.random.default_rng(seed).integers(0, 255, (4, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def blake(*contents: bytes) -> str:
    return hashlib.blake2b(b"".join(contents), digest_size=16).hexdigest()


def stat_key(path: Path) -> str:
    st = os.stat(path)
    return f"stat:{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}"


def test_file_key_hashes_a_file_with_its_voxel_file_and_stats_what_it_may_not_read(tmp_path):
    """The key of a regular file is the BLAKE2b-128 of its bytes (and its .img's, or the errno of an .img that
    cannot be opened); a file read as unreadable, a folder and a missing path get their stat or errno."""
    (tmp_path / "a.png").write_bytes(b"png bytes")
    (tmp_path / "v.hdr").write_bytes(b"header")
    (tmp_path / "v.img").write_bytes(b"voxels")
    (tmp_path / "lone.hdr").write_bytes(b"header")
    (tmp_path / "folder").mkdir()
    assert file_key(tmp_path / "a.png") == file_key(str(tmp_path / "a.png")) == blake(b"png bytes")
    assert file_key(tmp_path / "v.hdr") == blake(b"header", b"voxels")
    assert file_key(tmp_path / "lone.hdr") == blake(b"header", b"unreadable:2")
    assert file_key(tmp_path / "a.png", content=False) == stat_key(tmp_path / "a.png")
    assert file_key(tmp_path / "folder") == stat_key(tmp_path / "folder")
    assert file_key(tmp_path / "gone.png") == "missing:2"


def test_start_parts_clears_a_fresh_run_and_resumes_only_the_same_identity(tmp_path):
    parts = tmp_path / "out" / ".r.csv.parts"
    identity = {"checkpoint": "abc", "threshold": 1.5}
    start_parts(parts, identity, resume=True)  # nothing to resume: a fresh folder, below folders not there yet
    assert (parts / "run.json").read_text() == '{\n "checkpoint": "abc",\n "threshold": 1.5\n}'
    (parts / "rank0000-1.csv").write_text("x")
    start_parts(parts, identity, resume=True)
    assert sorted(p.name for p in parts.iterdir()) == ["rank0000-1.csv", "run.json"], "the same run's parts kept"
    with pytest.raises(UsageError) as err:
        start_parts(parts, {"checkpoint": "abd", "threshold": 2.0}, resume=True)
    assert str(err.value) == (f"--resume: the partial reports in {parts} were made by another run (checkpoint, "
                              "threshold differ); run again without --resume to score everything anew")  # fmt: skip
    with pytest.raises(UsageError, match=r"another run \(threshold differ\)"):
        start_parts(parts, {"checkpoint": "abc", "threshold": 2.0}, resume=True)
    (parts / "run.json").unlink()
    with pytest.raises(UsageError, match=r"another run \(they record no run identity\); run again"):
        start_parts(parts, identity, resume=True)
    start_parts(parts, {"checkpoint": "new"}, resume=False)
    assert sorted(p.name for p in parts.iterdir()) == ["run.json"], "a fresh run clears another run's parts"
    assert json.loads((parts / "run.json").read_text()) == {"checkpoint": "new"}


def test_write_part_keys_every_row_and_read_parts_reads_them_back_typed_oldest_first(tmp_path):
    """A part holds `PART_COLUMNS`, empty cells for None and each file's key (a stat key for an unreadable file);
    `read_parts` gives the rows as written (types, None, non-UTF-8 names, line breaks in a reason) part by part in
    the order of their write times, whatever their ranks."""
    name = tmp_path / "caf\udce9.png"  # a name that is not UTF-8
    name.write_bytes(b"image")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk")
    scored = slice_row(SliceSource(str(name), 2, "v\u00e9"), 1.25, 2.0)
    broken = error_row(UnreadableFileError(junk, "a\r\nb"))
    parts = tmp_path / "parts"
    parts.mkdir()
    late = write_part(parts, 3, [scored])
    assert re.fullmatch(r"rank0003-\d+\.csv", late.name)
    with open(late, newline="", encoding="utf-8", errors="surrogateescape") as f:
        assert list(csv.reader(f)) == [list(PART_COLUMNS), [
            "slice", str(name), "2", "", "v\u00e9", "", "", "1.25", "2.0", "in", "",
            *[""] * (len(COLUMNS) - 11), blake(b"image")]]  # fmt: skip
    late.rename(parts / "rank0000-100.csv")
    write_part(parts, 1, [broken]).rename(parts / "rank0001-99.csv")
    with c_locale():
        read = read_parts(parts)
    assert read == [broken | {"file_key": stat_key(junk)}, scored | {"file_key": blake(b"image")}]
    assert [type(read[1][k]) for k in ("slice", "time_point", "score", "threshold")] == [int, type(None), float,
                                                                                         float]  # fmt: skip


def test_plan_shard_deals_volumes_and_failures_to_ranks_and_a_resume_skips_only_what_is_done(tmp_path):
    """Rank r of w plans every w-th volume and every w-th failed file; `current` holds every input; only a resume
    (not a fresh run beside old parts) leaves out the files (good or unreadable) whose keys are in the parts."""
    folder, parts = tmp_path / "in", tmp_path / "parts"
    folder.mkdir()
    png = [folder / f"{name}.png" for name in "abc"]
    for k, path in enumerate(png):
        write_png(path, k)
    junk = [folder / "junk1.bin", folder / "junk2.bin"]
    for path in junk:
        path.write_bytes(b"not an image")
    (folder / "notes.txt").write_text("notes")
    (folder / "mine.png").write_bytes(b"skipped by exclude")
    phases = []

    def plan(rank: int, world: int, resume: bool):
        return plan_shard([folder], parts, rank, world, resume, exclude=lambda p: p.name == "mine.png",
                          progress=lambda total, phase: phases.append((total, phase)))  # fmt: skip

    plans = [plan(0, 2, True), plan(1, 2, True)]
    assert [[s.path for s in p.todo] for p in plans] == [[str(png[0]), str(png[2])], [str(png[1])]]
    assert [[e.path for e in p.failed] for p in plans] == [[str(junk[0])], [str(junk[1])]]
    assert [p.skipped for p in plans] == [0, 0] and phases == [(5, "reading headers")] * 2
    assert plans[0].ignored == [IgnoredFile(str(folder / "notes.txt"), "*.txt")]
    assert plans[0].current == {str(p) for p in png + junk} and [s.path for s in plans[1].found] == list(map(str, png))
    thresholds = Thresholds(32768.0)
    write_part(parts, 0, [*content_rows(png[0], str(png[0]), thresholds), error_row(plans[0].failed[0])])
    fresh = plan(0, 1, False)
    assert (len(fresh.todo), len(fresh.failed), fresh.skipped) == (3, 2, 0), "a fresh run plans everything"
    resumed = plan(0, 1, True)
    assert [s.path for s in resumed.todo] == [str(png[1]), str(png[2])]
    assert [e.path for e in resumed.failed] == [str(junk[1])] and resumed.skipped == 2
    assert ([s.path for s in resumed.found], resumed.ignored) == (list(map(str, png)), plans[0].ignored)


def test_plan_shard_passes_the_voxel_limit_and_the_ignore_globs_to_discovery(tmp_path):
    write_png(tmp_path / "a.png", 0)
    (tmp_path / "b.bin").write_bytes(b"not an image")
    (tmp_path / "c.txt").write_text("text")
    small = plan_shard([tmp_path], tmp_path / "parts", 0, 1, resume=False, max_voxels=15, ignore=("*.bin",))
    assert [e.path for e in small.failed] == [str(tmp_path / "a.png"), str(tmp_path / "c.txt")] and not small.todo
    assert small.ignored == [IgnoredFile(str(tmp_path / "b.bin"), "*.bin")]
    assert [s.path for s in plan_shard([tmp_path], tmp_path / "parts", 0, 1, resume=False, max_voxels=16).todo] == [
        str(tmp_path / "a.png")]  # fmt: skip


def test_merge_drops_and_logs_the_rows_of_a_file_no_longer_among_the_inputs(tmp_path, caplog):
    thresholds = Thresholds(32768.0)
    kept, gone = tmp_path / "kept.png", tmp_path / "gone.png"
    write_png(kept, 0)
    write_png(gone, 1)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_part(parts, 0, [*content_rows(gone, "g", thresholds), *content_rows(kept, "k", thresholds)])
    with caplog.at_level(logging.WARNING, logger="cdm_ood.shards"):
        rows = merge(parts, thresholds, "max", {str(kept)})
    assert rows == report_rows(content_rows(kept, "k", thresholds), thresholds, "max")
    assert caplog.messages == [f"1 files of the partial reports are no longer among the inputs; their rows are "
                               f"dropped (e.g. {gone})"]  # fmt: skip


def test_clear_removes_the_parts_and_takes_a_missing_folder_in_stride(tmp_path):
    (tmp_path / "parts" / "sub").mkdir(parents=True)
    (tmp_path / "parts" / "sub" / "rank0000-1.csv").write_text("x")
    clear(tmp_path / "parts")
    clear(tmp_path / "parts")
    assert list(tmp_path.iterdir()) == []


def test_score_into_parts_saves_the_errors_calls_progress_and_writes_maps_into_a_new_folder(checkpoint, tmp_path):
    """The partial reports go into a folder made with its parents; they hold the files that failed before scoring
    as well as the scored ones; `progress` counts the files and `maps` gets each scored slice's map."""
    from cdm_ood.data.discovery import discover
    from cdm_ood.ood.map_outputs import MapWriter

    detector = OODDetector.from_checkpoint(checkpoint)
    write_raw_nifti(phantom_volume(np.random.default_rng(5), size=16, slices=2), tmp_path / "in" / "scan.nii")
    sources = discover([tmp_path / "in"])
    failed = UnreadableFileError(tmp_path / "in" / "gone.dcm", "truncated")
    handled: list[int] = []
    parts = tmp_path / "new" / "parts"
    writer = MapWriter(tmp_path / "maps", sources=sources)
    score_into_parts(detector, detector.thresholds, sources, [failed], parts, 0, progress=handled.append, maps=writer)
    found = sorted(
        (r["level"], Path(r["path"]).name, r["slice"], r["verdict"] == "unreadable") for r in read_parts(parts)
    )
    assert found == [("file", "gone.dcm", None, True), ("slice", "scan.nii", 0, False), ("slice", "scan.nii", 1, False)]
    assert sum(handled) == 1
    assert sorted(p.suffix for p in (tmp_path / "maps").rglob("*.*"))
