"""The package's structure, as issue 45 sets it: the folders are layers that import only the layers below them, no
import cycle between modules (imports inside functions count; those only for type checkers do not), the training job
imports nothing from `ood/`, and no module grows past 450 lines (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "cdm_ood"
MAX_LINES = 450
# The package's folders, lowest first; `cdm_ood/errors.py` and the package root are shared by all, `cli/` sits on top.
LAYERS = ("utils", "diffusion", "data", "model", "ood", "jobs", "node", "integrations")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in its code, except under `if TYPE_CHECKING:`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def test_no_module_imports_itself_back():
    graph = {name: imports(name) for name in MODULES}
    cycles = []
    for start in graph:  # depth-first from each module: a path back to it is a cycle
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not cycles, "\n".join(sorted(cycles))


def layer(name: str) -> int | None:
    """The position in `LAYERS` of the folder that holds module `name` (None: the root or `errors`)."""
    folder = name.split(".")[1] if "." in name else None
    return LAYERS.index(folder) if folder in LAYERS else None


def test_every_module_sits_in_a_layer():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    loose = set(MODULES) - {"cdm_ood", "cdm_ood.errors"} - {m for m in MODULES if layer(m) is not None}
    assert folders == set(LAYERS) and not loose, (folders, loose)


def test_each_layer_imports_only_the_layers_below_it():
    upward = [f"{name} -> {target}" for name in MODULES for target in imports(name)
              if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)]  # fmt: skip
    assert not upward, "\n".join(sorted(upward))


def test_the_import_graph_sees_imports_inside_functions():
    assert "cdm_ood.ood.batch" in imports("cdm_ood.ood.api"), "api imports batch inside score_frame"
    assert "cdm_ood.jobs.training" not in imports("cdm_ood.jobs.validation"), "a TYPE_CHECKING import does not count"


def test_training_imports_nothing_from_ood():
    assert not {m for m in imports("cdm_ood.jobs.training") if m.startswith("cdm_ood.ood")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_line_limit(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES, f"{MODULES[name]}: split it by job"


def test_the_python_api_class_is_a_thin_facade():
    tree = ast.parse(MODULES["cdm_ood.ood.api"].read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OODDetector"]
    assert cls.end_lineno - cls.lineno < 200, "OODDetector grew: move what needs no threshold to ImageScorer"
