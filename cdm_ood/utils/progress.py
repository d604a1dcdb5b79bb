"""Progress reporting of long jobs, independent of how it is shown (a bar, log lines: see `cli/common.py`).

A job that learns its total late takes a `ProgressFactory`: it calls `factory(total, phase)` once the total is
known and then the returned function with each number of items done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, TypeVar

Update = Callable[[int], Any]
ProgressFactory = Callable[[int, str], Update]
T = TypeVar("T")


def counted(items: Iterable[T], update: Optional[Update]) -> Iterator[T]:
    """`items`, calling `update(1)` once each one has been handled (when the next one is asked for)."""
    for item in items:
        yield item
        if update is not None:
            update(1)
