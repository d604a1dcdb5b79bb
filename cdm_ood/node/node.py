"""The DICOM node's work: a series that has gone quiet (received by C-STORE, or fetched from a DICOMweb server) is
gated with exactly the rules of `cdm-ood score` (`ood.gate.run_gate`: the same report rows, volume checks,
fail-closed verdicts, maps and DICOM results), then forwarded to the destination when every volume of it passed, or
held in quarantine with its report, SR and map. Every decision and every forwarding attempt is a line of
`decisions.jsonl` (`spool`); a destination that is down delays forwarding (`forward.Backoff`), never drops a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from ..data.guards import redact
from ..ood.gate import run_gate, write_gate_page
from ..ood.report import FAILING
from ..ood.scoring import ImageScorer
from ..ood.thresholds import Thresholds
from .dicomweb import DicomWebSource
from .forward import Backoff, Destination, ForwardError, send
from .spool import Spool

log = logging.getLogger("cdm_ood.node")

FORWARD, HOLD = "forward", "hold"


class Source(Protocol):
    """Where the node finds series besides C-STORE: `poll` puts what is new into the spool."""

    name: str

    def poll(self) -> int: ...


@dataclass
class NodeSettings:
    """What the node does with a series: the quiet period after its last instance (seconds; `by_study`: after its
    study's last instance), where passed series go (None: nowhere, they wait in `outbox/`), whether held series
    are forwarded too (with their SR and map, for a person to decide), the per-volume aggregate, and how the
    threshold was set, in words (for each batch's QA page)."""

    quiet: float = 30.0
    by_study: bool = False
    destination: Optional[Destination] = None
    forward_held: bool = False
    per_volume: str = "mean"
    backoff: Backoff = field(default_factory=Backoff)
    threshold_source: str = "calibrated"


class Node:
    """Gates and routes the spool's series (see the module); `step` does what is due now, `run` loops it. Every
    `poll` seconds it also polls its `sources` (`watch.FolderSource`, `dicomweb.DicomWebSource`: each puts what is
    new into the spool), and each decided batch's results go back to `results_to` (a DICOMweb server)."""

    def __init__(
        self, spool: Spool, scorer: ImageScorer, thresholds: Thresholds, settings: NodeSettings,
        sources: Sequence[Source] = (), results_to: Optional[DicomWebSource] = None, poll: float = 30.0,
    ) -> None:  # fmt: skip
        self.spool, self.scorer, self.thresholds, self.settings = spool, scorer, thresholds, settings
        self.sources, self.results_to, self.poll = list(sources), results_to, poll
        self._next_try = self._next_poll = 0.0

    def recover(self) -> None:
        """`Spool.recover`, before anything is received: say what the spool held."""
        found = self.spool.recover()
        log.info("spool %s: %d series waiting, %d batches to gate again, %d to forward", self.spool.root,
                 found["waiting"], found["work"], found["outbox"])  # fmt: skip

    def run(self, stopped: Callable[[], bool], every: float = 0.5) -> None:
        """`step` every `every` seconds until `stopped()` (after `recover`)."""
        while not stopped():
            self.step()
            time.sleep(every)

    def step(self) -> None:
        """Poll the sources when due, gate the batches whose gating a stop interrupted and the series gone quiet,
        then forward what is due."""
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll
            calls = [(source.name, source.poll) for source in self.sources]
            if self.results_to is not None:
                calls.insert(0, (self.results_to.name, self.results_to.retry))
            for name, call in calls:
                try:
                    call()
                except Exception as err:  # a server down, a share gone: polled again later
                    log.warning("%s not polled: %s: %s", name, type(err).__name__, redact(err))
        decided = self.spool.decisions()
        for batch in self.spool.batches("work"):
            if batch.name in decided:  # decided before a stop, not yet moved on
                self._route(batch, decided[batch.name]["decision"])
            else:
                self.gate(batch)
        for key in self.spool.quiet(self.settings.quiet, self.settings.by_study):
            self.gate(self.spool.claim(key))
        self.forward_due()

    def gate(self, batch: Path) -> str:
        """Gate one batch (`run_gate`, report and DICOM results inside the batch folder), record the decision, and
        route it; returns the decision. A gate that fails for another reason holds the batch (fail closed)."""
        instances = sorted((batch / "instances").glob("*.dcm"))
        entry: dict[str, Any] = {
            "event": "decided",
            "batch": batch.name,
            "study_instance_uid": _study(batch),
            "series_instance_uid": batch.name.rsplit(".", 1)[0],
            "instances": len(instances),
        }
        try:
            start = time.perf_counter()
            result = run_gate(self.scorer, self.thresholds, [batch / "instances"], batch / "report.csv",
                              self.settings.per_volume, maps=batch / "results", page=batch / "report.html")  # fmt: skip
            write_gate_page(
                result,
                batch / "report.html",
                self.scorer,
                self.settings.threshold_source,
                seconds=time.perf_counter() - start,
                title=f"cdm-ood listen: series batch {batch.name}",
            )
        except Exception as err:  # the node keeps running: this batch is held with the reason
            entry |= {"decision": HOLD, "reason": f"the gate failed: {type(err).__name__}: {redact(err)}"}
        else:
            rows = [r for r in result.rows if r["level"] in ("volume", "file") and r["verdict"] != "ignored"]
            entry |= {"decision": FORWARD if result.passed else HOLD,
                      "volumes": [{k: r[k] for k in ("volume", "verdict", "score", "reason")}
                                  for r in rows if r["level"] == "volume"],
                      "files": [{"path": Path(r["path"]).name, "verdict": r["verdict"], "reason": r["reason"]}
                                for r in rows if r["level"] == "file" and r["verdict"] in FAILING]}  # fmt: skip
        self.spool.record(entry)
        log.info("series %s (%d instances): %s", batch.name, len(instances), entry["decision"])
        routed = self._route(batch, entry["decision"])
        if self.results_to is not None:
            self.results_to.give_back(routed, result_files(routed, entry["decision"]))
        return entry["decision"]

    def _route(self, batch: Path, decision: str) -> Path:
        held = decision != FORWARD
        return self.spool.move(batch, "quarantine" if held and not self.settings.forward_held else "outbox")

    def forward_due(self) -> None:
        """Send every batch of `outbox/` to the destination, unless it failed recently (`Backoff`)."""
        destination = self.settings.destination
        if destination is None or time.monotonic() < self._next_try:
            return
        decided = self.spool.decisions()
        for batch in self.spool.batches("outbox"):
            decision = decided.get(batch.name, {}).get("decision", HOLD)
            files = forwarded_files(batch, decision)
            try:
                send(files, destination)
            except (ForwardError, OSError) as err:
                wait = self.settings.backoff.failed()
                self._next_try = time.monotonic() + wait
                self.spool.record({"event": "forward-failed", "batch": batch.name, "to": str(destination),
                                   "error": str(err), "retry_in_s": wait})  # fmt: skip
                log.warning("series %s not forwarded to %s (%s); next try in %g s", batch.name, destination, err, wait)
                return
            self.settings.backoff.succeeded()
            self.spool.record({"event": "forwarded", "batch": batch.name, "to": str(destination),
                               "files": len(files), "decision": decision})  # fmt: skip
            log.info("series %s forwarded to %s (%d files)", batch.name, destination, len(files))
            if decision == FORWARD:
                self.spool.move(batch, "sent")
            else:  # held, forwarded for a person to decide: kept in quarantine
                self.spool.move(batch, "quarantine")


def result_files(batch: Path, decision: str) -> list[Path]:
    """A decided batch's DICOM results that travel: its verdict SRs, and a held batch's anomaly maps too."""
    results = sorted((batch / "results").glob("*_sr.dcm"))
    return results + (sorted((batch / "results").glob("*_map.dcm")) if decision != FORWARD else [])


def forwarded_files(batch: Path, decision: str) -> list[Path]:
    """What a batch sends: its instances and its `result_files`."""
    return sorted((batch / "instances").glob("*.dcm")) + result_files(batch, decision)


def _study(batch: Path) -> Optional[str]:
    marker = batch / "study"
    return marker.read_text().strip() if marker.is_file() else None
