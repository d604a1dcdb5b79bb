"""Forwarding a batch to the destination AE (a C-STORE SCU, pynetdicom): every file in one association, the
association's presentation contexts from the files' own SOP classes and transfer syntaxes. A destination that
cannot be reached, refuses the association or fails an instance raises `ForwardError`; the node keeps the batch
and tries again later (`Backoff`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# C-STORE statuses that mean the destination holds the instance: success and its warnings (coercion of data
# elements, elements discarded, data set does not match the SOP class).
STORED = (0x0000, 0xB000, 0xB006, 0xB007)
MAX_CONTEXTS = 128  # presentation contexts one association may propose
_ADDRESS = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>[0-9]{1,5})$")


class ForwardError(RuntimeError):
    """The batch did not reach the destination (why, without any header value)."""


@dataclass(frozen=True)
class Destination:
    """A DICOM node: its AE title, host and port (`AET@host:port`), and the AE title the node calls it with."""

    ae_title: str
    host: str
    port: int
    calling: str = "CDMOOD"

    @classmethod
    def parse(cls, text: str, calling: str = "CDMOOD") -> Destination:
        found = _ADDRESS.match(text.strip())
        if found is None or not 0 < int(found["port"]) < 65536:
            raise UsageError(f"destination {text!r}: expected AET@host:port (an AE title of at most 16 characters)")
        return cls(found["aet"], found["host"], int(found["port"]), calling)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _contexts(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs of the files, each once."""
    import pydicom

    pairs: dict[tuple[str, str], None] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        pairs[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    if len(pairs) > MAX_CONTEXTS:
        raise ForwardError(f"{len(pairs)} SOP class and transfer syntax pairs: more than one association may propose")
    return list(pairs)


def send(paths: Sequence[Path], destination: Destination, timeout: float = 30.0) -> int:
    """C-STORE every file of `paths` to `destination` in one association; returns how many were stored."""
    from pydicom.uid import UID
    from pynetdicom import AE

    ae = AE(ae_title=destination.calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = _contexts(paths)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise ForwardError(f"{destination}: no association (unreachable, or the association was rejected)")
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for sop_class, syntax in contexts:
            if (sop_class, syntax) not in accepted:
                raise ForwardError(f"{destination} does not accept {UID(sop_class).name} in {UID(syntax).name}")
        for path in paths:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in STORED:
                what = "no response" if code is None else f"status 0x{code:04X}"
                raise ForwardError(f"{destination}: C-STORE of {Path(path).name} failed ({what})")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(paths)


@dataclass
class Backoff:
    """When to try a failing destination again: `first` seconds after the first failure, doubling up to `most`."""

    first: float = 2.0
    most: float = 300.0
    failures: int = 0

    def failed(self) -> float:
        """Count a failure; returns the seconds to wait before the next try."""
        self.failures += 1
        return min(self.most, self.first * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
