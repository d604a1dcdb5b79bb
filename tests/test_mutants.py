"""The lists of tools/mutants.py stay current: each hand mutant's old text occurs exactly once and its tests exist,
each reviewed equivalent mutant still names a function that holds its line. (The mutation run itself, about an hour,
is `make mutants`.)"""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def load_mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_hand_mutant_applies_once_and_names_existing_tests():
    mutants = load_mutants()
    assert mutants.check_texts() == []
    assert len({m.name for m in mutants.HAND}) == len(mutants.HAND)
    for m in mutants.HAND:
        assert m.old != m.new and m.tests, m.name
        for test in m.tests:
            path, name = test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), test


def test_a_stale_old_text_is_reported(tmp_path):
    mutants = load_mutants()
    first = mutants.HAND[0]
    (tmp_path / first.path).parent.mkdir(parents=True)
    (tmp_path / first.path).write_text("rewritten\n")
    for m in mutants.HAND[1:]:
        (tmp_path / m.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / m.path).write_text((ROOT / m.path).read_text())
    assert mutants.check_texts(tmp_path) == [
        f"{first.name}: its old text occurs 0 times in {first.path}, not once: update the list"
    ]


def test_every_reviewed_equivalent_mutant_names_a_line_of_its_function():
    mutants = load_mutants()
    entries = mutants.load_equivalent()
    assert entries and mutants.check_equivalent(entries) == []
    assert all(entry["function"].startswith("cdm_ood.") for entry in entries)


def test_an_equivalent_entry_whose_line_or_function_is_gone_is_reported(tmp_path):
    mutants = load_mutants()
    source = "class Box:\n    def fit(self, x):\n        return x + 1\n"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(source)
    entries = [
        {"function": "pkg.mod.Box.fit", "old": "return x + 1", "new": "return x - 1", "reason": "r"},
        {"function": "pkg.mod.Box.fit", "old": "return x + 2", "new": "return x - 2", "reason": "r"},
        {"function": "pkg.mod.Box.predict", "old": "return x + 1", "new": "return x", "reason": "r"},
    ]
    assert mutants.check_equivalent(entries, tmp_path) == [
        "pkg.mod.Box.fit: no line 'return x + 2'",
        "pkg.mod.Box.predict: no such function",
    ]


def test_mutmut_names_map_to_the_function_they_change():
    mutants = load_mutants()
    assert mutants.function_of("cdm_ood.ood.report.x_judge__mutmut_3") == "cdm_ood.ood.report.judge"
    assert mutants.function_of("cdm_ood.ood.report.x__volume_row__mutmut_12") == "cdm_ood.ood.report._volume_row"
    assert (
        mutants.function_of("cdm_ood.ood.detectors.xǁDetectorǁ__init____mutmut_2")
        == "cdm_ood.ood.detectors.Detector.__init__"
    )
