"""Named markdown tables on stdout, the form `tools/evidence.py` splices into docs/.

A script prints each result that a doc shows as `emit(name, text)`: the text between `<!-- table: name -->` and
`<!-- /table -->` lines. `make evidence` runs the script, takes every such block from its output and replaces
the block of the same name in docs/*.md, so no number in a doc is typed by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

BLOCK = re.compile(r"^<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)


def markdown(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of `rows` (cells formatted by the caller) under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(name: str, text: str) -> None:
    """Print `text` as the table block `name` (flushed, so a long job's earlier tables are not lost)."""
    print(f"<!-- table: {name} -->\n{text.strip()}\n<!-- /table -->", flush=True)


def blocks(output: str) -> dict[str, str]:
    """Every table block in a script's output, by name (the text between its markers)."""
    return {m["name"]: m["body"].strip() for m in BLOCK.finditer(output)}
