"""The ready-made workflows in pipelines/, run on real files with the tiny trained checkpoint."""

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

PIPELINES = Path(__file__).parent.parent / "pipelines"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qa_gate_reports_new_studies_once_and_gates_on_them(checkpoint, scans, tmp_path, capsys):
    gate = load("qa_gate")
    args = ["--checkpoint", str(checkpoint), "--incoming", str(scans), "--reports", str(tmp_path)]
    assert gate.main(args) == 1, "the folder holds unreadable files"
    (report,) = tmp_path.glob("qa-*.csv")
    text = report.read_text()
    assert "broken.dcm" in text and "junk.bin" in text and "clean.nii.gz" in text
    assert f"file,{scans / 'notes.txt'},,,,,,,,ignored," in text, "the ignored sidecar is a row, not judged"
    out = capsys.readouterr().out
    assert "UNREADABLE" in out and "passed: False" in out and "notes.txt" not in out
    assert gate.main(args) == 0 and "nothing new" in capsys.readouterr().out
    assert gate.main([*args[:1], str(tmp_path / "missing.pt"), *args[2:]]) == 2
    (tmp_path / "quiet").mkdir()
    empty = ["--checkpoint", str(checkpoint), "--incoming", str(tmp_path / "quiet"), "--reports", str(tmp_path)]
    assert gate.main(empty) == 0 and "nothing new" in capsys.readouterr().out
    (tmp_path / "a-file").write_text("where the reports folder should be")
    blocked = [*args[:4], "--reports", str(tmp_path / "a-file")]
    assert gate.run(blocked) == 3, "a run that cannot finish is no decision"
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: FileExistsError") and "a-file" in line


def test_monai_chain_sets_aside_ood_slices(checkpoint, scans):
    """With `--detector denoise` (on the tiny model it tells the strongly spiked volume from a clean one, slice by
    slice) the four spiked slices are set aside and the four clean ones reach the downstream model, windowed."""
    out = subprocess.run(
        [sys.executable, str(PIPELINES / "monai_inference_chain.py"), "--checkpoint", str(checkpoint),
         "--detector", "denoise", str(scans / "clean.nii.gz"), str(scans / "spiked.nii.gz")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if " slice " in line]
    rows = [re.fullmatch(r"(\S+) slice \d: score \S+ -> (SET ASIDE \(OOD\)|processed: (\S+))", line) for line in lines]
    assert len(lines) == 8 and all(rows), out.stdout
    outcomes = Counter((Path(m[1]).name, m[2].split(":")[0]) for m in rows)
    assert outcomes == {("clean.nii.gz", "processed"): 4, ("spiked.nii.gz", "SET ASIDE (OOD)"): 4}, out.stdout
    assert all(0 < float(m[3]) < 1 for m in rows if m[3]), "the downstream model's input, windowed to [0, 1]"
