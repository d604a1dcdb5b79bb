"""Abandoned requests stop being scored: the served model looks between batches whether the request it scores was
given up (its client left, its time limit passed, the server is stopping) and stops there, so that no thread keeps
computing an answer nobody will read.

`cdm-ood serve` (`cdm_ood.integrations.rest`) hands each request's `Request` down to the scoring thread in a
context variable; under `mlflow models serve` the model starts its own, with MLflow's request timeout as its time limit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

log = logging.getLogger(__name__)


class AbandonedRequestError(Exception):
    """The request being scored was given up; raised between two batches."""


class Request:
    """One request's fate: the server calls `cancel` (from its event loop), the scoring thread `check`."""

    def __init__(self, time_limit_s: Optional[float] = None) -> None:
        self.reason: Optional[str] = None
        self.deadline = math.inf if time_limit_s is None else time.monotonic() + time_limit_s

    def cancel(self, reason: str) -> None:
        """Give the request up (the first reason stays); its scoring stops at its next batch."""
        if self.reason is None:
            self.reason = reason

    def check(self, done: int, total: int) -> None:
        """Raise `AbandonedRequestError`, with a warning in the server's log, when the request was given up or its time
        limit has passed; `done` of `total` images are scored so far."""
        if self.reason is None and time.monotonic() >= self.deadline:
            self.cancel("time limit passed")
        if self.reason is not None:
            message = f"request abandoned ({self.reason}): scoring stopped after {done} of {total} images"
            log.warning(message)
            raise AbandonedRequestError(message)


_CURRENT: ContextVar[Optional[Request]] = ContextVar("cdm_ood_request", default=None)


@contextmanager
def serving(request: Request) -> Iterator[Request]:
    """Code run in this context, and threads it starts with `asyncio.to_thread`, score on behalf of `request`."""
    token = _CURRENT.set(request)
    try:
        yield request
    finally:
        _CURRENT.reset(token)


def current_request() -> Optional[Request]:
    """The request being scored: the one `serving` set; else, inside MLflow's scoring server (`mlflow models
    serve` sets its request timeout $MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default, for the server), one
    with that timeout as its time limit, counted from now; else (in-process use, Spark, `mlflow models predict`)
    none."""
    if (request := _CURRENT.get()) is not None:
        return request
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() and MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.defined:
        return Request(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    return None
