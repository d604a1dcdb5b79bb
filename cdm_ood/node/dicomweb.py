"""A DICOMweb source for sites whose PACS speaks only the web (dicomweb-client, `cdm-ood[dicomweb]`): QIDO-RS finds
the series the node has not fetched yet, WADO-RS fetches each into the spool (`Spool.store`; it is then gated like a
series received by C-STORE, after its quiet period), and STOW-RS returns each decided series' SRs (and a held
series' maps) to the server.

What was fetched and returned is recorded in `decisions.jsonl` (`fetched`, `returned`, `return-failed`): a restart
fetches no series twice, and the node's own result series are never fetched. A batch whose results could not be
returned keeps a `return-pending` marker and is tried again at the next poll.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, Optional

from ..data.guards import redact
from ..errors import MissingExtraError
from .spool import SeriesKey, Spool, safe_uid

log = logging.getLogger("cdm_ood.node")

PENDING = "return-pending"  # marker file of a batch whose results are still to be returned
_STUDY, _SERIES = "0020000D", "0020000E"  # DICOM JSON keys of StudyInstanceUID and SeriesInstanceUID


def _value(attributes: Mapping[str, Any], tag: str) -> Optional[str]:
    values = attributes.get(tag, {}).get("Value") or [None]
    return values[0]


class DicomWebSource:
    """Polls `url` (a DICOMweb service root) for series matching `filters` (QIDO-RS query keys, e.g.
    `{"Modality": "CT"}`), fetches them into `spool` and returns results to it (see the module)."""

    def __init__(self, url: str, spool: Spool, filters: Optional[Mapping[str, str]] = None, client: Any = None):
        if client is None:
            try:
                from dicomweb_client.api import DICOMwebClient
            except ImportError:
                raise MissingExtraError("dicomweb-client", "dicomweb") from None
            client = DICOMwebClient(url)
            client.set_http_retry_params(retry=False)  # the node tries again itself, at the next poll: never blocks
        self.url, self.spool, self.filters, self.client = url, spool, dict(filters or {}), client
        self.name = url

    def _known(self) -> set[str]:
        """Series fetched before and the node's own result series."""
        known: set[str] = set()
        for entry in self.spool.entries():
            if entry.get("event") == "fetched":
                known.add(entry["series_instance_uid"])
            elif entry.get("event") == "returned":
                known.update(entry["series"])
        return known

    def poll(self) -> int:
        """Fetch every series the server lists that is not known yet; returns the instances fetched."""
        known, fetched = self._known(), 0
        for attributes in self.client.search_for_series(search_filters=self.filters or None):
            study, series = _value(attributes, _STUDY), _value(attributes, _SERIES)
            if series is None or series in known or study is None:
                continue
            key = SeriesKey(safe_uid(study, "StudyInstanceUID"), safe_uid(series, "SeriesInstanceUID"))
            instances = self.client.retrieve_series(study, series)
            for ds in instances:
                self.spool.store(_encoded(ds), key, safe_uid(ds.SOPInstanceUID, "SOPInstanceUID"))
            self.spool.record({"event": "fetched", "study_instance_uid": study, "series_instance_uid": series,
                               "instances": len(instances), "from": self.url})  # fmt: skip
            fetched += len(instances)
        return fetched

    def give_back(self, batch: Path, files: list[Path]) -> bool:
        """STOW-RS `files` (a decided batch's SRs, and maps when held) to the server; on failure the batch keeps a
        `PENDING` marker (with the files' names) for `retry`."""
        import pydicom

        datasets = [pydicom.dcmread(path) for path in files]
        try:
            if datasets:
                self.client.store_instances(datasets)
        except Exception as err:  # the server is down or refused them: tried again at the next poll
            (batch / PENDING).write_text("\n".join(path.name for path in files))
            self.spool.record({"event": "return-failed", "batch": batch.name, "to": self.url,
                               "error": f"{type(err).__name__}: {redact(err)}"})  # fmt: skip
            log.warning("results of %s not returned to %s: %s", batch.name, self.url, type(err).__name__)
            return False
        (batch / PENDING).unlink(missing_ok=True)
        self.spool.record({"event": "returned", "batch": batch.name, "to": self.url, "files": len(datasets),
                           "series": sorted({str(ds.SeriesInstanceUID) for ds in datasets})})  # fmt: skip
        return True

    def retry(self) -> None:
        """Return the results of every batch that still has a `PENDING` marker, wherever it is now."""
        for stage in ("outbox", "quarantine", "sent"):
            for batch in self.spool.batches(stage):
                marker = batch / PENDING
                if marker.is_file():
                    names = marker.read_text().split()
                    self.give_back(batch, [batch / "results" / name for name in names])


def _encoded(ds: Any) -> bytes:
    """A fetched data set as file bytes (preamble, file meta, data set), as a C-STORE would have brought it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
