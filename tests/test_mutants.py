"""The mutation list of tools/mutants.py stays current: each old text occurs exactly once, each named test exists.
(The mutation run itself, minutes long, is `python tools/mutants.py`.)"""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def load_mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_once_and_names_existing_tests():
    mutants = load_mutants()
    assert mutants.check_texts() == []
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert m.old != m.new and m.tests, m.name
        for test in m.tests:
            path, name = test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), test


def test_a_stale_old_text_is_reported(tmp_path):
    mutants = load_mutants()
    first = mutants.MUTANTS[0]
    (tmp_path / first.path).parent.mkdir(parents=True)
    (tmp_path / first.path).write_text("rewritten\n")
    for m in mutants.MUTANTS[1:]:
        (tmp_path / m.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / m.path).write_text((ROOT / m.path).read_text())
    assert mutants.check_texts(tmp_path) == [
        f"{first.name}: its old text occurs 0 times in {first.path}, not once: update the list"
    ]
