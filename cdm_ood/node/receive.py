"""The node's storage SCP (pynetdicom): C-ECHO, and C-STORE of every image storage SOP class in the transfer syntaxes
the readers decode (uncompressed, deflated, and with `cdm-ood[codecs]` the JPEG family and RLE). Only the calling AE
titles allowed are accepted; TLS when given a certificate. Each instance is written to the spool durably
(`spool.Incoming.store`) before the response says success; one that cannot be (a full disk, no valid UIDs) is answered
with a failure status, and the sender keeps it.

`Receivers` runs the SCP in several processes that accept on one listening socket (the pre-fork model of web
servers): pynetdicom reads each PDU in Python, and one process holding every association on one interpreter lock
is the limit of receiving (docs/node.md measures it). The node's own process gates and forwards.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Optional

from pynetdicom.transport import ThreadedAssociationServer

from .spool import Incoming, SeriesKey, Spool, safe_uid

log = logging.getLogger("cdm_ood.node")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# The transfer syntaxes a storage context accepts, most preferred first: what pydicom decodes without plugins,
# then what `cdm-ood[codecs]` decodes (`formats.dicom`).
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


@dataclass(frozen=True)
class ScpSettings:
    """Who may send and how: the node's AE title, port and address, the calling AE titles accepted (empty: any),
    and for TLS a certificate and key (and a CA file to require and check the sender's certificate)."""

    ae_title: str = "CDMOOD"
    port: int = 11112
    host: str = "0.0.0.0"
    allowed: Sequence[str] = ()
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None


def image_storage_classes() -> list[str]:
    """The UIDs of every image storage SOP class pynetdicom knows (`formats.dicom.IMAGE_STORAGE` in the name)."""
    from pydicom.uid import UID
    from pynetdicom import AllStoragePresentationContexts

    from ..data.formats.dicom import IMAGE_STORAGE

    return [
        cx.abstract_syntax for cx in AllStoragePresentationContexts if IMAGE_STORAGE in UID(cx.abstract_syntax).name
    ]


def tls_context(settings: ScpSettings) -> Optional[ssl.SSLContext]:
    """The server's TLS context (None without a certificate); with a CA file, senders must present a certificate
    it signed."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.tls_ca)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.verify_mode = ssl.CERT_REQUIRED if settings.tls_ca else ssl.CERT_NONE
    return context


def series_of(encoded: bytes) -> tuple[SeriesKey, str]:
    """The study, series and SOP instance UIDs of an instance's file bytes (as folder names: `safe_uid`)."""
    import pydicom

    tags = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=tags)
    key = SeriesKey(safe_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
                    safe_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"))  # fmt: skip
    return key, safe_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")


def _cannot_start(settings: ScpSettings, reason: object) -> RuntimeError:
    return RuntimeError(f"the node could not start on {settings.host}:{settings.port}: {reason}")


def storage_ae(store: Spool | Incoming, settings: ScpSettings, classes: Optional[Sequence[str]] = None) -> tuple:
    """The storage SCP's application entity, for `classes` (default: `image_storage_classes`), and its event
    handlers (C-STORE into `store`, C-ECHO)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO and DEBUG lines can show header values
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in classes or image_storage_classes():
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    if settings.allowed:
        ae.require_calling_aet = list(settings.allowed)
    ae.maximum_associations = 16
    # No limit on the PDUs senders send (pynetdicom's default, 16 kB, cuts a 512x512 slice into 32 PDUs, and its
    # reactor polls between them).
    ae.maximum_pdu_size = 0

    def on_store(event: Any) -> int:
        try:
            encoded = event.encoded_dataset(include_meta=True)
            key, sop = series_of(encoded)
        except Exception as err:  # malformed data set or UIDs: refused, named by the calling AE only
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, type(err).__name__)
            return CANNOT_UNDERSTAND
        try:
            store.store(encoded, key, sop)
        except OSError as err:  # a full disk: not acknowledged, the sender keeps the instance
            log.error("C-STORE of %s not stored: %s", sop, err.strerror or err)
            return OUT_OF_RESOURCES
        return SUCCESS

    return ae, [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]


class SharedSocketServer(ThreadedAssociationServer):  # type: ignore[misc]
    """pynetdicom's server, accepting on a socket that another process bound and listens on (`Receivers`)."""

    def __init__(self, *args: Any, listening: socket.socket, **kwargs: Any) -> None:
        self.listening = listening
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.listening
        self.server_address = self.listening.getsockname()

    def server_activate(self) -> None:
        """Already listening."""


class _Relay(logging.Handler):
    """Hands a receiver process's log record to the logger of the same name in the node's process."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _receiver(listening: socket.socket, incoming: str, settings: ScpSettings, classes: Sequence[str],
              ready: Any, logs: Any, parent: int) -> None:  # fmt: skip
    """A receiver process: the SCP on the shared socket, storing into `incoming`, until it is terminated or the
    node's process is gone (killed: its receivers must not hold the port)."""
    logging.getLogger("cdm_ood").addHandler(logging.handlers.QueueHandler(logs))
    logging.getLogger("cdm_ood").setLevel(logging.INFO)
    logging.getLogger("cdm_ood").propagate = False
    try:
        ae, handlers = storage_ae(Incoming(incoming), settings, classes)
        server = ae.make_server((settings.host, settings.port), evt_handlers=handlers, listening=listening,
                                ssl_context=tls_context(settings), server_class=SharedSocketServer)  # fmt: skip
    except Exception as err:  # a bad certificate, say: the node reports it and stops
        ready.send(f"{type(err).__name__}: {err}")
        return
    threading.Thread(target=server.serve_forever, name="cdm-ood-scp", daemon=True).start()
    ready.send(None)
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


class Receivers:
    """The storage SCP in `processes` processes (spawned: no state of the node's but the arguments) accepting on one
    socket that this process binds, each storing into the spool's `incoming/`. `check` raises when one has died;
    `shutdown` stops them."""

    def __init__(self, spool: Spool, settings: ScpSettings, processes: int) -> None:
        try:
            self.listening = socket.create_server((settings.host, settings.port), backlog=64)
        except OSError as err:  # the port is taken, or not ours to bind
            raise _cannot_start(settings, err.strerror or err) from None
        context = multiprocessing.get_context("spawn")
        self.logs = context.Queue()
        self.relay = logging.handlers.QueueListener(self.logs, _Relay())
        self.relay.start()
        classes = image_storage_classes()
        self.processes, waiting = [], []
        for _ in range(processes):
            ours, theirs = context.Pipe(duplex=False)
            process = context.Process(target=_receiver, name="cdm-ood-receiver", daemon=True,
                                      args=(self.listening, str(spool.incoming.folder), settings, classes, theirs,
                                            self.logs, os.getpid()))  # fmt: skip
            process.start()
            theirs.close()  # the receiver's end: once it exits, `recv` here ends instead of waiting
            self.processes.append(process)
            waiting.append(ours)
        for ours in waiting:
            try:
                error = ours.recv() if ours.poll(120) else "did not start within 120 s"
            except EOFError:
                error = "a receiver process exited before it listened"
            if error is not None:
                self.shutdown()
                raise _cannot_start(settings, error)
        log.info("listening as %s on %s:%d with %d receiver processes%s", settings.ae_title, settings.host,
                 self.listening.getsockname()[1], processes, " (TLS)" if settings.tls_cert else "")  # fmt: skip

    def check(self) -> bool:
        """False while every receiver runs; raises `RuntimeError` when one has exited."""
        for process in self.processes:
            if process.exitcode is not None:
                raise RuntimeError(f"a receiver process exited (code {process.exitcode}); the node stops")
        return False

    def shutdown(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(30)
        self.listening.close()
        self.relay.stop()
