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


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) `level` interval of a binomial proportion k / n."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    lo = float(beta.ppf(tail, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - tail, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def rate(k: int, n: int) -> str:
    """`k/n (95% interval lo-hi)`, the exact binomial interval."""
    lo, hi = clopper_pearson(k, n)
    return f"{k}/{n} (95% interval {lo:.2f}-{hi:.2f})"
