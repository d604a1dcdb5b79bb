"""The node's storage SCP (pynetdicom): C-ECHO, and C-STORE of every image storage SOP class in the transfer syntaxes
the readers decode (uncompressed, deflated, and with `cdm-ood[codecs]` the JPEG family and RLE). Only the calling AE
titles allowed are accepted; TLS when given a certificate. Each instance is written to the spool durably
(`Spool.store`) before the response says success; one that cannot be (a full disk, no valid UIDs) is answered
with a failure status, and the sender keeps it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Optional

from ..data.formats.dicom import IMAGE_STORAGE
from .spool import SeriesKey, Spool, safe_uid

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


def start_scp(spool: Spool, settings: ScpSettings) -> Any:
    """Start the storage SCP in its own threads; returns the server (`.shutdown()` stops it)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO and DEBUG lines can show header values
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in image_storage_classes():
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    if settings.allowed:
        ae.require_calling_aet = list(settings.allowed)
    ae.maximum_associations = 16
    # No limit on the PDUs senders send (pynetdicom's default, 16 kB, cuts a 512x512 slice into 32 PDUs, and its
    # reactor polls between them: 5x fewer instances per second).
    ae.maximum_pdu_size = 0

    def on_store(event: Any) -> int:
        try:
            encoded = event.encoded_dataset(include_meta=True)
            key, sop = series_of(encoded)
        except Exception as err:  # malformed data set or UIDs: refused, named by the calling AE only
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, type(err).__name__)
            return CANNOT_UNDERSTAND
        try:
            spool.store(encoded, key, sop)
        except OSError as err:  # a full disk: not acknowledged, the sender keeps the instance
            log.error("C-STORE of %s not stored: %s", sop, err.strerror or err)
            return OUT_OF_RESOURCES
        return SUCCESS

    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
    try:
        server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers,
                                 ssl_context=tls_context(settings))  # fmt: skip
    except OSError as err:  # the port is taken, or not ours to bind
        where = f"{settings.host}:{settings.port}"
        raise RuntimeError(f"the node could not start on {where}: {err.strerror or err}") from None
    log.info("listening as %s on %s:%d%s", settings.ae_title, settings.host, settings.port,
             " (TLS)" if settings.tls_cert else "")  # fmt: skip
    return server
