"""The REST server of `cdm-ood serve`: MLflow's own scoring app (`mlflow.pyfunc.scoring_server`: /ping, /health,
/version, /invocations, the request formats of `mlflow models serve`) behind `RequestLimits`, run by uvicorn.

What it adds to `mlflow models serve`: a 413 for a request body over the size limit, read no further than its headers
(or than the limit, for a body of unknown length); scoring that stops at its next batch when the client disconnects,
when MLflow's time limit answers 504, or when the server stops (`cdm_ood.integrations.cancellation`); and a short grace
period on SIGTERM, after which requests still running are abandoned and the server exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import UsageError
from .cancellation import Request, serving

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

MODEL_PATH = "CDM_OOD_SERVE_MODEL"  # the local folder of the model, for each worker (`create_app`)
MAX_REQUEST_MB = "CDM_OOD_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 16.0
DRAIN_S = 30.0  # how long the rest of a body over the limit is read and dropped (as nginx's lingering_time)


class RequestLimits:
    """ASGI middleware: answers 413 to a request whose body exceeds `max_bytes` (at once from its Content-Length,
    else when the streamed body passes the limit), and serves every other request under a `cancellation.Request`
    that it cancels when the client disconnects, when the request is answered (a 504 from MLflow's time limit comes
    while its scoring still runs) or when the server stops, so that scoring stops at its next batch."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await self._body(scope, receive, send)
        if body is None:
            return
        request, gone = Request(), asyncio.Event()

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": bytes(body), "more_body": False}, None
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            await receive()  # the whole body is read: the next message is http.disconnect
            request.cancel("client disconnected")  # no-op once answered
            gone.set()

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":  # a 504 from MLflow's time limit leaves its scoring running
                request.cancel("timed out" if message["status"] == 504 else "answered")
            await send(message)

        watcher = asyncio.create_task(watch())
        try:
            with serving(request):
                await self.app(scope, replay, answer)
        except asyncio.CancelledError:
            request.cancel("server stopping")
            raise
        finally:
            watcher.cancel()

    async def _body(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> bytearray | None:
        """The request body; None when the client left while sending it, or when it exceeds the limit and was
        answered 413 (by its Content-Length before any of it is read, else once the part read passes the limit)."""
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        body, too_large = bytearray(), length.isdigit() and int(length) > self.max_bytes
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            too_large = len(body) > self.max_bytes
            if not message.get("more_body", False):
                break
        if too_large:
            waiting = not body and headers.get(b"expect", b"").lower() == b"100-continue"  # has sent no body
            await self._too_large(receive, send, drain=not waiting)
            return None
        return body

    async def _too_large(self, receive: Receive, send: Send, drain: bool) -> None:
        """413 with a JSON error as MLflow's scoring server writes them (`error_code`, `message`). With `drain`, the
        rest of the body is read and dropped (for at most `DRAIN_S`) before the answer ends, so that a client that
        sends its whole body before it reads (most HTTP libraries) gets the 413 rather than a reset connection; a
        client that waits for `Expect: 100-continue` gets it before sending any body."""
        content = json.dumps({
            "error_code": "REQUEST_TOO_LARGE",
            "message": f"request body over the limit of {self.max_bytes / 1e6:g} MB: send fewer images per request, "
                       f"or raise the limit (cdm-ood serve --max-request-mb, ${MAX_REQUEST_MB})",
        }).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": drain})
        if drain:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(receive), DRAIN_S)
            await send({"type": "http.response.body", "body": b""})


async def _drain(receive: Receive) -> None:
    """Read the request body to its end (or the client's disconnect), keeping none of it."""
    while (await receive()).get("more_body", False):
        pass


def create_app() -> RequestLimits:
    """uvicorn's app factory, in each worker: MLflow's scoring app of the model folder $CDM_OOD_SERVE_MODEL behind
    `RequestLimits` of $CDM_OOD_MAX_REQUEST_MB (16 MB)."""
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH]))
    return RequestLimits(app, int(float(os.environ.get(MAX_REQUEST_MB, DEFAULT_MAX_REQUEST_MB)) * 1e6))


def serve(
    model_uri: str, host: str, port: int, workers: int, max_request_mb: float, timeout_s: int, shutdown_s: int
) -> None:
    """Serve the model at `model_uri` (models:/..., runs:/..., a folder) until SIGTERM or Ctrl-C: it is downloaded
    once, then every uvicorn worker loads it (`create_app`). A URI that names no MLflow model is a `UsageError`; a
    server that cannot start (a port in use) raises `RuntimeError`."""
    import mlflow
    import uvicorn
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.exceptions import MlflowException

    try:
        folder = mlflow.artifacts.download_artifacts(model_uri)
        mlflow.models.Model.load(folder)  # its MLmodel file, read here rather than failing in every worker
    except MlflowException as err:
        raise UsageError(f"cannot serve {model_uri}: {err.message}") from err
    os.environ[MODEL_PATH] = folder
    os.environ[MAX_REQUEST_MB] = str(max_request_mb)
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(timeout_s)
    try:
        uvicorn.run("cdm_ood.integrations.rest:create_app", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=shutdown_s)  # fmt: skip
    except SystemExit as stop:  # uvicorn's own exit when it cannot start (e.g. the port is taken): the command failed
        if stop.code:
            raise RuntimeError(f"the server could not start on {host}:{port} (its log above says why)") from None
