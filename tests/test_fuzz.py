"""The readers' fuzzing inputs (`tools/fuzz_readers.py`): every seed of the corpus, and every input the fuzzer
found to crash, hang or blow the memory budget (kept in `tests/fuzz/crashers/` with its fix), ends as slices or as
exactly one `DataError`."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SEEDS = sorted((ROOT / "tests" / "fuzz" / "corpus").iterdir())
CRASHERS = sorted((ROOT / "tests" / "fuzz" / "crashers").glob("*-*"))


def fuzz_tool():
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "tools" / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = fuzz_tool()


def test_the_seeds_cover_every_suffix_and_read_as_slices(tmp_path):
    assert {TOOL.split(seed.read_bytes())[0] for seed in SEEDS} == set(TOOL.SUFFIXES) - {""}
    for seed in SEEDS:
        slices, errors = TOOL.read_input(seed.read_bytes(), tmp_path)
        assert slices > 0 and not errors, (seed.name, errors)


@pytest.mark.parametrize("case", [*SEEDS, *CRASHERS], ids=lambda p: p.name)
def test_a_fuzzer_input_ends_as_slices_or_one_data_error(case, tmp_path):
    TOOL.check(case.read_bytes(), tmp_path)


@pytest.mark.parametrize("cut", [0, 1, 7, 100, 350, 700])
def test_a_truncated_seed_ends_as_slices_or_one_data_error(cut, tmp_path):
    """What the fuzzer tries first: each seed cut short (a selector byte alone, a header cut mid-field)."""
    for seed in SEEDS:
        TOOL.check(seed.read_bytes()[: cut + 1], tmp_path)
