"""`make evidence` (tools/evidence.py): every number-bearing table in docs/ is a block that a registered script
printed, and the splicing replaces exactly the named blocks."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import evidence  # noqa: E402

NUMBER = re.compile(r"^\**[-+]?\d[\d,]*(\.\d+)?\s*(%|x|s|ms|GiB|MiB|MB|GB|min)?\**$")


def tables(text: str) -> list[tuple[int, int, list[str]]]:
    """Each markdown table of `text`: first and last line index, and its body cells."""
    lines, found, i = text.split("\n"), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            cells = [c.strip() for line in lines[i + 2 : j] for c in line.strip().strip("|").split("|")]
            found.append((i, j - 1, cells))
            i = j
        else:
            i += 1
    return found


def block_lines(text: str) -> list[tuple[int, int, str, str]]:
    """Each generated block of `text`: first and last line index, name and body."""
    return [(text[: m.start()].count("\n"), text[: m.end()].count("\n"), m["name"], m["body"])
            for m in evidence.BLOCK.finditer(text)]  # fmt: skip


def test_every_number_bearing_table_in_the_docs_is_a_generated_block():
    loose = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text()
        spans = [(a, b) for a, b, _, _ in block_lines(text)]
        for first, last, cells in tables(text):
            numbers = [c for c in cells if NUMBER.match(c)]
            if numbers and not any(a < first and last < b for a, b in spans):
                loose.append(f"{path.name}:{first + 1} ({numbers[:3]})")
    assert not loose, f"tables with numbers outside a `<!-- table: name -->` block: {loose}"


def test_every_block_in_the_docs_is_printed_by_a_registered_step_and_names_its_command():
    printers = {t: s for s in evidence.STEPS for t in s.tables}
    shown = set()
    for path in sorted((ROOT / "docs").glob("*.md")):
        for _, _, name, body in block_lines(path.read_text()):
            if name == "mutants":  # the mutation table, printed by `make mutants` (tools/mutants.py), not a step
                last = body.strip().rsplit("\n", 1)[-1]
                assert last.startswith(("*Printed by `make mutants` (", "*Printed by `python tools/mutants.py")), last
                continue
            assert name in printers, f"{path.name}: block {name!r} is printed by no step of tools/evidence.py"
            step = printers[name]
            assert step.script == "cdm-ood" or (ROOT / step.script).is_file(), step.script
            generated = f"*Printed by `{step.shell()}` (" in body.strip().rsplit("\n", 1)[-1]
            assert generated, f"{path.name}: block {name!r} was typed in, not printed by `{step.shell()}`"
            shown.add(name)
    assert shown == set(printers), f"registered tables that no doc shows: {set(printers) - shown}"


def test_splice_replaces_the_named_blocks_only():
    doc = "a\n<!-- table: x -->\nold x\n<!-- /table -->\nb\n<!-- table: y -->\nold y\n<!-- /table -->\n"
    new, found = evidence.splice(doc, {"x": "| 1 |\n\nline", "z": "unused"})
    assert found == {"x"}
    assert new == "a\n<!-- table: x -->\n| 1 |\n\nline\n<!-- /table -->\nb\n<!-- table: y -->\nold y\n<!-- /table -->\n"


def test_the_commit_stamp_is_dirty_for_changed_code_not_for_the_docs_the_steps_write(tmp_path, monkeypatch):
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "docs").mkdir()
    for name in ("docs/ranking.md", "script.py"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    monkeypatch.setattr(evidence, "ROOT", tmp_path)
    clean = evidence.commit()
    assert not clean.endswith("+dirty") and clean != "unknown"
    (tmp_path / "docs" / "ranking.md").write_text("a table an earlier step spliced\n")
    assert evidence.commit() == clean, "a run of several steps splices docs before the later ones finish"
    (tmp_path / "script.py").write_text("b\n")
    assert evidence.commit() == clean + "+dirty"


def test_a_step_brings_the_steps_it_needs_when_their_output_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "ROOT", tmp_path)
    assert [s.name for s in evidence.plan(["ranking-phantoms"])] == ["demo", "ranking-phantoms"]
    made = tmp_path / evidence.BY_NAME["demo"].makes
    made.parent.mkdir(parents=True)
    made.touch()
    assert [s.name for s in evidence.plan(["ranking-phantoms"])] == ["ranking-phantoms"]
    assert all(n in evidence.BY_NAME for s in evidence.STEPS for n in s.needs)
    order = [s.name for s in evidence.STEPS]
    assert all(order.index(n) < order.index(s.name) for s in evidence.STEPS for n in s.needs)


def test_the_tables_of_a_step_are_rebuilt_from_its_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(evidence, "WORK", tmp_path)
    log = tmp_path / "bombs.log"
    log.write_text("the step's output\n")
    evidence.record(evidence.BY_NAME["bombs"], 12.0, {"bombs": "| old |"}, log, "abc1234")
    evidence.record(evidence.BY_NAME["bombs"], 13.0, {"bombs": "| new |\n\n*Printed by ...*"}, log, "abc1234")
    assert evidence.from_store(["bombs", "normalisation"]) == {"bombs": "| new |\n\n*Printed by ...*"}
