"""The DICOM node (`cdm-ood listen`) as a site runs it: real processes on free local ports, dcmtk's `storescu` and
`echoscu` as the modality, dcmtk's `storescp` as the destination, the tiny trained checkpoint as the model."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from mlflow.tracking import MlflowClient
from processes import free_port, system_tool

from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series
from cdm_ood.errors import MissingExtraError, UsageError
from cdm_ood.integrations.tracking import NodeRun
from cdm_ood.node.dicomweb import PENDING, DicomWebSource
from cdm_ood.node.forward import Backoff, Destination, ForwardError, send
from cdm_ood.node.node import Node, NodeSettings, forwarded_files, result_files
from cdm_ood.node.receive import Receivers, ScpSettings, series_of
from cdm_ood.node.spool import SeriesKey, Spool
from cdm_ood.node.watch import FolderSource

SENDER = "MODALITY"


def wait_for(test, what: str, timeout: float = 120.0, process=None):
    deadline = time.time() + timeout
    while (found := test()) in (None, False, [], {}):
        assert process is None or process.poll() is None, f"the process ended while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return found


class Listener:
    """`cdm-ood listen` in its own session on a free local port, its output in a file."""

    def __init__(self, checkpoint: Path, spool: Path, log: Path, *options: str, port: int = 0) -> None:
        self.port, self.log = port or free_port(), log
        command = [sys.executable, "-m", "cdm_ood.cli", "listen", "--checkpoint", str(checkpoint), "--spool",
                   str(spool), "--port", str(self.port), "--host", "127.0.0.1", "--allow", SENDER,
                   "--detector", "denoise", *options]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        echo = [system_tool("echoscu"), "-aet", SENDER, "-aec", "CDMOOD", "127.0.0.1", str(self.port)]
        wait_for(lambda: subprocess.run(echo, capture_output=True).returncode == 0, "C-ECHO", process=self.process)

    def send(self, folder: Path, aet: str = SENDER) -> subprocess.CompletedProcess:
        command = [system_tool("storescu"), "-aet", aet, "-aec", "CDMOOD", "+sd", "+r", "127.0.0.1", str(self.port),
                   str(folder)]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)


class Pacs:
    """dcmtk's `storescp` as the PACS the node forwards to: every instance it receives, in a folder."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.port, self.folder = port or free_port(), folder
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [system_tool("storescp"), "-aet", "PACS", "-od", str(folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def received(self) -> dict[str, str]:
        """SOPInstanceUID -> SOP class name of every file received."""
        found = {}
        for path in self.folder.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found[ds.SOPInstanceUID] = ds.SOPClassUID.name
        return found

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def uids(folder: Path) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.rglob("*.dcm")}


def decided(spool: Path) -> list[dict]:
    return [e for e in Spool(spool).entries() if e.get("event") == "decided"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Three studies as a modality sends them: a clean CT phantom series, a series of noise (OOD), and a two-echo
    series."""
    root, rng = tmp_path_factory.mktemp("studies"), np.random.default_rng(11)
    clean = phantom_volume(rng, size=16, slices=4)
    write_dicom_series(clean, root / "clean", modality="ct", volume_index=0)
    noise = np.rint(rng.normal(0.0, 500.0, clean.shape))  # far from any CT the model saw
    write_dicom_series(noise, root / "ood", modality="ct", volume_index=1)
    uid, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for echo in (1, 2):
        write_dicom_series(
            phantom_volume(rng, size=16, slices=4),
            root / "echoes",
            modality="ct",
            volume_index=2,
            series_uid=uid,
            study_uid=study,
            stem=f"echo{echo}",
            fields={"EchoNumbers": echo},
        )
    return {name: root / name for name in ("clean", "ood", "echoes")}


def test_the_node_forwards_clean_series_holds_ood_ones_and_gates_each_echo(checkpoint, studies, tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", "--quiet", "1", "--forward",
                    f"PACS@127.0.0.1:{pacs.port}")  # fmt: skip
    try:
        for name in ("clean", "ood", "echoes"):
            sent = node.send(studies[name])
            assert sent.returncode == 0, sent.stderr
        entries = wait_for(lambda: (lambda d: d if len(d) == 3 else None)(decided(tmp_path / "spool")),
                           "3 decisions", process=node.process)  # fmt: skip
        wait_for(lambda: not list((tmp_path / "spool" / "outbox").iterdir()), "the outbox to empty")
    finally:
        node.stop()
        pacs.stop()
    by_series = {e["series_instance_uid"]: e for e in entries}
    series = {name: pydicom.dcmread(next(studies[name].glob("*.dcm"))).SeriesInstanceUID for name in studies}
    clean, ood, echoes = (by_series[series[name]] for name in ("clean", "ood", "echoes"))
    assert (clean["decision"], ood["decision"], echoes["decision"]) == ("forward", "hold", "forward"), entries
    assert [v["verdict"] for v in ood["volumes"]] == ["ood"]
    assert sorted(v["volume"] for v in echoes["volumes"]) == [f"{series['echoes']}[echo{e}]" for e in (1, 2)]
    received = pacs.received()
    assert uids(studies["clean"]) | uids(studies["echoes"]) <= set(received)
    assert not uids(studies["ood"]) & set(received), "a held series is not forwarded"
    srs = [v for v in received.values() if v == "Comprehensive SR Storage"]
    assert len(srs) == 3, "an SR per volume forwarded: the clean series and each echo"
    (held,) = (tmp_path / "spool" / "quarantine").iterdir()
    assert uids(held / "instances") == uids(studies["ood"])
    assert (held / "report.csv").is_file() and len(list((held / "results").glob("*_sr.dcm"))) == 1
    assert 'data-count="ood">1<' in (held / "report.html").read_text(), "each batch has its QA page"
    assert len(list((held / "results").glob("*_map.dcm"))) == 1
    log = (tmp_path / "node.log").read_text() + (tmp_path / "spool" / "decisions.jsonl").read_text()
    assert "PHANTOM" not in log, "no patient identifier in the node's log or decisions"


def test_a_killed_node_loses_no_acknowledged_instance_and_decides_each_series_once(checkpoint, studies, tmp_path):
    spool, half = tmp_path / "spool", tmp_path / "half"
    files = sorted(studies["clean"].glob("*.dcm"))
    for k, path in enumerate(files):
        (half / ("a" if k < 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, half / ("a" if k < 2 else "b") / path.name)
    node = Listener(checkpoint, spool, tmp_path / "node.log", "--quiet", "30")
    assert node.send(half / "a").returncode == 0
    node.stop(signal.SIGKILL)  # acknowledged, not yet quiet
    node = Listener(checkpoint, spool, tmp_path / "node.log", "--quiet", "1", port=node.port)
    try:
        assert node.send(half / "b").returncode == 0
        (entry,) = wait_for(lambda: decided(spool), "a decision", process=node.process)
    finally:
        node.stop()
    assert entry["instances"] == 4 and entry["decision"] == "forward", entry
    (batch,) = (spool / "outbox").iterdir()  # no destination: it waits there
    assert uids(batch / "instances") == uids(studies["clean"])
    node = Listener(checkpoint, spool, tmp_path / "node.log", "--quiet", "1", port=node.port)
    time.sleep(3)
    node.stop()
    assert len(decided(spool)) == 1, "a decided batch is never gated again"


def receiver_processes(pid: int) -> list[int]:
    """The node's receiver processes (spawned by multiprocessing; its resource tracker is not one)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   for pid in pids)  # fmt: skip


def test_receiver_processes_end_with_the_node_and_a_dead_one_stops_it(checkpoint, tmp_path):
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", "--receivers", "2")
    receivers = receiver_processes(node.process.pid)
    assert len(receivers) == 2
    os.kill(receivers[0], signal.SIGKILL)
    assert node.process.wait(timeout=60) == 3, "a node that cannot receive any more stops with a failure"
    assert "a receiver process exited" in (tmp_path / "node.log").read_text()
    wait_for(lambda: gone(receivers), "the other receiver to stop")
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", port=node.port)
    receivers = receiver_processes(node.process.pid)
    os.kill(node.process.pid, signal.SIGKILL)  # the node alone, as `kill -9 <pid>` would
    node.process.wait(timeout=30)
    wait_for(lambda: gone(receivers), "the receivers of a killed node to exit")
    with socket.create_server(("127.0.0.1", node.port)):
        pass  # the port is free for the node's restart


def test_a_destination_that_is_down_gets_every_passed_series_once_it_is_up(checkpoint, studies, tmp_path):
    port = free_port()
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", "--quiet", "1", "--forward",
                    f"PACS@127.0.0.1:{port}")  # fmt: skip
    pacs = None
    try:
        assert node.send(studies["clean"]).returncode == 0
        wait_for(lambda: [e for e in Spool(tmp_path / "spool").entries() if e.get("event") == "forward-failed"],
                 "a failed forward", process=node.process)  # fmt: skip
        pacs = Pacs(tmp_path / "pacs", port)
        wait_for(lambda: [e for e in Spool(tmp_path / "spool").entries() if e.get("event") == "forwarded"],
                 "the forward", process=node.process)  # fmt: skip
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()
    assert uids(studies["clean"]) <= set(pacs.received())
    assert list((tmp_path / "spool" / "sent").iterdir()) and not list((tmp_path / "spool" / "outbox").iterdir())


def test_a_calling_ae_title_not_allowed_is_refused(checkpoint, studies, tmp_path):
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log")
    try:
        refused = node.send(studies["clean"], aet="STRANGER")
    finally:
        node.stop()
    assert refused.returncode != 0 and not list((tmp_path / "spool" / "incoming").rglob("*.dcm"))


def test_the_spool_writes_before_acknowledging_and_claims_a_quiet_series_whole(tmp_path, studies):
    spool = Spool(tmp_path / "spool")
    for path in sorted(studies["clean"].glob("*.dcm")):
        key, sop = series_of(path.read_bytes())
        stored = spool.store(path.read_bytes(), key, sop)
        assert stored.read_bytes() == path.read_bytes() and stored.name == f"{sop}.dcm"
    assert spool.quiet(60) == [] and spool.quiet(0) == [key]
    (spool.partial / "torn").write_bytes(b"half")
    assert Spool(tmp_path / "spool").recover() == {"waiting": 1, "work": 0, "outbox": 0}
    assert not (spool.partial / "torn").exists(), "a write never acknowledged is dropped at a restart"
    batch = spool.claim(key)
    assert batch.name == f"{key.series}.1" and len(list((batch / "instances").iterdir())) == 4
    assert (batch / "study").read_text() == key.study and spool.quiet(0) == []
    spool.record({"event": "decided", "batch": batch.name, "decision": "hold"})
    with open(spool.log_path, "a") as f:
        f.write('{"event": "decided", "batch": "torn')  # a kill mid-write
    restarted = Spool(spool.root)
    assert list(spool.decisions()) == [batch.name] == list(restarted.decisions()), "read again at a start"
    restarted.record({"event": "decided", "batch": "after", "decision": "hold"})
    assert list(Spool(spool.root).decisions()) == [batch.name, "after"], "the torn line does not swallow the next"
    spool.store(next(studies["clean"].glob("*.dcm")).read_bytes(), key, "1.2.3")
    assert spool.claim(key).name == f"{key.series}.2", "a late instance is a batch of its own"


def test_a_series_moves_to_work_only_between_two_stores_and_waits_a_quiet_period_after_a_start(tmp_path, studies):
    spool, (first, second, *_) = Spool(tmp_path / "spool"), sorted(studies["clean"].glob("*.dcm"))
    key, sop = series_of(first.read_bytes())
    folder = spool.store(first.read_bytes(), key, sop).parent
    os.utime(folder, (time.time() - 60, time.time() - 60))  # its last instance arrived a minute ago
    restarted = Spool(tmp_path / "spool")
    restarted.recover()
    assert spool.quiet(30) == [key] and restarted.quiet(30) == [], "quiet counted from a restart"
    claimed = []
    with spool.incoming.locked(exclusive=False):  # a receiver process between its mkdir and its rename
        mover = threading.Thread(target=lambda: claimed.append(spool.claim(key)))
        mover.start()
        mover.join(0.5)
        assert mover.is_alive() and (spool.incoming.folder / key.study / key.series / f"{sop}.dcm").exists()
    mover.join(10)
    late, late_sop = series_of(second.read_bytes())
    spool.store(second.read_bytes(), late, late_sop)
    assert [p.name for p in (claimed[0] / "instances").iterdir()] == [f"{sop}.dcm"]
    assert spool.quiet(0) == [key], "an instance after the claim starts the series' next batch"


def test_invalid_uids_destinations_and_the_backoff(studies):
    ds = pydicom.dcmread(next(studies["clean"].glob("*.dcm")))
    ds.SeriesInstanceUID = "../../etc"  # never a folder name
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ValueError, match="SeriesInstanceUID is not a valid UID"):
        series_of(buffer.getvalue())
    assert str(Destination.parse("PACS@pacs.example:104")) == "PACS@pacs.example:104"
    for bad in ("PACS", "PACS@host", "TOO_LONG_AE_TITLE_X@h:1", "PACS@h:0", "PACS@h:70000"):
        with pytest.raises(UsageError, match="expected AET@host:port"):
            Destination.parse(bad)
    backoff = Backoff(first=2, most=10)
    assert [backoff.failed() for _ in range(5)] == [2, 4, 8, 10, 10]
    backoff.succeeded()
    assert backoff.failed() == 2


def scp(spool: Path, **settings) -> tuple[object, int]:
    """A node's storage SCP (one receiver process) on a free local port, spooling into `spool`."""
    port = free_port()
    return Receivers(Spool(spool), ScpSettings(port=port, host="127.0.0.1", **settings), 1), port


def test_forwarding_to_a_storage_scp_stores_every_instance_and_a_refused_caller_is_named(studies, tmp_path):
    server, port = scp(tmp_path / "far", ae_title="FAR", allowed=("NEAR",))
    files = sorted(studies["echoes"].glob("*.dcm"))
    try:
        assert send(files, Destination("FAR", "127.0.0.1", port, calling="NEAR")) == 8
        with pytest.raises(ForwardError, match="no association"):
            send(files, Destination("FAR", "127.0.0.1", port, calling="STRANGER"))
    finally:
        server.shutdown()
    assert uids(tmp_path / "far" / "incoming") == uids(studies["echoes"])


def test_the_node_scp_speaks_tls_when_given_a_certificate(studies, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                           "-days", "1", "-subj", "/CN=localhost"], capture_output=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    server, port = scp(tmp_path / "spool", tls_cert=str(cert), tls_key=str(key))
    try:
        plain = subprocess.run([system_tool("echoscu"), "-to", "5", "127.0.0.1", str(port)], capture_output=True)
        secure = subprocess.run([system_tool("echoscu"), "+tls", key, cert, "+cf", cert, "127.0.0.1", str(port)],
                                capture_output=True, text=True)  # fmt: skip
    finally:
        server.shutdown()
    assert plain.returncode != 0, "a sender without TLS gets no association"
    assert secure.returncode == 0, secure.stderr


def test_the_node_gates_routes_and_retries_a_destination_in_process(checkpoint, studies, tmp_path):
    from cdm_ood.cli.score import _scorer

    scorer, thresholds = _scorer(checkpoint, "denoise", 8)
    spool = Spool(tmp_path / "spool")
    for name in ("clean", "ood"):
        for path in sorted(studies[name].glob("*.dcm")):
            key, sop = series_of(path.read_bytes())
            spool.store(path.read_bytes(), key, sop)
    port = free_port()
    settings = NodeSettings(quiet=0.0, destination=Destination("PACS", "127.0.0.1", port), backoff=Backoff(first=0.01))
    node = Node(spool, scorer, thresholds, settings)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = NodeRun({"detector": scorer.name}, store, scorer.model)
    spool.listeners.append(tracker)
    node.step()  # the destination is down: both gated, the passed one waits
    events = [(e["event"], e.get("decision")) for e in spool.entries()]
    assert sorted(events) == [("decided", "forward"), ("decided", "hold"), ("forward-failed", None)]
    assert len(spool.batches("outbox")) == 1 and len(spool.batches("quarantine")) == 1
    server, port = scp(tmp_path / "gate", ae_title="FAR")  # another gate accepts images only: refused, and said
    try:
        node.settings.destination = Destination("FAR", "127.0.0.1", port)
        time.sleep(0.05)
        node.step()
    finally:
        server.shutdown()
    refused = [e for e in spool.entries() if e["event"] == "forward-failed"][-1]["error"]
    assert refused.endswith("does not accept Comprehensive SR Storage in Explicit VR Little Endian"), refused
    pacs = Pacs(tmp_path / "pacs", port)  # the PACS is up
    try:
        node.settings.destination = Destination("PACS", "127.0.0.1", port)
        time.sleep(0.05)
        wait_for(lambda: node.step() or not spool.batches("outbox"), "the forward")
    finally:
        pacs.stop()
    assert [e["event"] for e in spool.entries()][-1] == "forwarded"
    (sent,) = spool.batches("sent")
    srs = {pydicom.dcmread(p).SOPInstanceUID for p in (sent / "results").glob("*_sr.dcm")}
    assert set(pacs.received()) == uids(studies["clean"]) | srs and len(srs) == 1, "a passed series with its SR"
    assert forwarded_files(sent, "forward") == [*sorted((sent / "instances").glob("*.dcm")),
                                                *sorted((sent / "results").glob("*_sr.dcm"))]  # fmt: skip
    tracker.close(spool.log_path)
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["detector"] == "denoise"
    counts = {k: run.data.metrics[k] for k in ("series_forward", "series_hold", "instances_gated", "forwarded")}
    assert counts == {"series_forward": 1, "series_hold": 1, "instances_gated": 8, "forwarded": 1}
    assert run.data.metrics["forward_failed"] == 2, "the destination down, then a gate that refuses SRs"
    history = client.get_metric_history(tracker.run_id, "forwarded")
    assert [m.value for m in history][-1] == 1 and history[-1].step == len(list(spool.entries()))
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["decisions.jsonl"]
    (held,) = spool.batches("quarantine")
    assert {p.name.rsplit("_", 1)[1] for p in forwarded_files(held, "hold") if p.parent.name == "results"} == {
        "sr.dcm", "map.dcm"}  # fmt: skip
    work = spool.claim(spool.quiet(0)[0]) if spool.quiet(0) else None
    assert work is None, "nothing left to gate"


class Orthanc:
    """A real Orthanc (Debian package `orthanc`, with its DICOMweb plugin) as the PACS: free local HTTP and DICOM
    ports, its database in a temporary folder."""

    PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

    def __init__(self, folder: Path) -> None:
        binary = system_tool("Orthanc", "orthanc")
        self.http, self.dicom = free_port(), free_port()
        config = {"Name": "cdm-ood-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "Plugins": [str(self.PLUGIN)] if self.PLUGIN.is_file() else []}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        with (folder / "orthanc.log").open("w") as out:
            self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_for(lambda: self.get("/system"), "Orthanc", timeout=60, process=self.process)

    def get(self, route: str):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{route}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def stored(self) -> dict[str, str]:
        """SOPInstanceUID -> SOP class UID of every instance Orthanc holds."""
        found = {}
        for instance in self.get("/instances"):
            tags = self.get(f"/instances/{instance}/simplified-tags")
            found[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
        return found

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def test_three_studies_from_storescu_clean_to_orthanc_with_its_sr_ood_held_echoes_gated_each(
    checkpoint, studies, tmp_path
):  # fmt: skip
    """The issue's acceptance run: dcmtk's storescu sends a clean, an OOD and a two-echo study to the node, which
    forwards what passed to a real Orthanc and holds the rest."""
    orthanc = Orthanc(tmp_path / "orthanc")
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", "--quiet", "1", "--forward",
                    f"ORTHANC@127.0.0.1:{orthanc.dicom}")  # fmt: skip
    try:
        for name in ("clean", "ood", "echoes"):
            assert node.send(studies[name]).returncode == 0
        wait_for(lambda: len([e for e in Spool(tmp_path / "spool").entries() if e.get("event") == "forwarded"]) == 2,
                 "two forwards", process=node.process)  # fmt: skip
        stored = orthanc.stored()
        study = pydicom.dcmread(next(studies["clean"].glob("*.dcm"))).StudyInstanceUID
        web = orthanc.get(f"/dicom-web/studies/{study}/series")
    finally:
        node.stop()
        orthanc.stop()
    passed = uids(studies["clean"]) | uids(studies["echoes"])
    assert passed <= set(stored) and not uids(studies["ood"]) & set(stored), "what passed, and nothing held"
    kinds = sorted(pydicom.uid.UID(c).name for u, c in stored.items() if u not in passed)
    assert kinds == ["Comprehensive SR Storage"] * 3, "an SR per volume: the clean series and each echo"
    assert sorted(s["00080060"]["Value"][0] for s in web) == ["CT", "SR"], "DICOMweb lists the series and its SR"
    echoes = [e for e in decided(tmp_path / "spool") if len(e["volumes"]) == 2]
    assert [sorted(v["verdict"] for v in e["volumes"]) for e in echoes] == [["in", "in"]], "gated per echo"
    (held,) = (tmp_path / "spool" / "quarantine").iterdir()
    assert uids(held / "instances") == uids(studies["ood"]) and (held / "report.csv").is_file()
    assert [len(list((held / "results").glob(f"*_{kind}.dcm"))) for kind in ("sr", "map")] == [1, 1]


def test_a_dicomweb_pacs_is_polled_fetched_gated_and_given_its_results_back(checkpoint, studies, tmp_path):
    from cdm_ood.cli.score import _scorer

    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        for name in ("clean", "ood"):  # the PACS holds two series
            sent = subprocess.run([system_tool("storescu"), "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom), "+sd",
                                   str(studies[name])], capture_output=True, text=True)  # fmt: skip
            assert sent.returncode == 0, sent.stderr
        url = f"http://127.0.0.1:{orthanc.http}/dicom-web"
        spool = Spool(tmp_path / "spool")
        scorer, thresholds = _scorer(checkpoint, "denoise", 8)
        web = DicomWebSource(url, spool)
        node = Node(spool, scorer, thresholds, NodeSettings(quiet=0.0), [web], web, poll=0.0)
        node.step()
        events = [e["event"] for e in spool.entries()]
        assert sorted(events) == ["decided", "decided", "fetched", "fetched", "returned", "returned"], events
        stored = orthanc.stored()
        node.step()  # the node's own results are not fetched back; nothing new to gate
        assert [e["event"] for e in spool.entries()] == events and orthanc.stored() == stored
        dead = DicomWebSource(f"http://127.0.0.1:{free_port()}/dicom-web", spool)
        (held,) = spool.batches("quarantine")
        assert not dead.give_back(held, result_files(held, "hold"))
        assert (held / PENDING).is_file() and spool.entries() and [*spool.entries()][-1]["event"] == "return-failed"
        node.step()  # retried at the next poll
        assert not (held / PENDING).exists() and [*spool.entries()][-1]["event"] == "returned"
    finally:
        orthanc.stop()
    images = uids(studies["clean"]) | uids(studies["ood"])
    kinds = sorted(pydicom.uid.UID(c).name for u, c in stored.items() if u not in images)
    assert kinds == ["Comprehensive SR Storage", "Comprehensive SR Storage", "Parametric Map Storage"], kinds
    decisions = {e["series_instance_uid"]: e["decision"] for e in spool.entries() if e["event"] == "decided"}
    series = {name: pydicom.dcmread(next(studies[name].glob("*.dcm"))).SeriesInstanceUID for name in studies}
    assert decisions == {series["clean"]: "forward", series["ood"]: "hold"}


def test_the_dicomweb_source_names_its_extra_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dicomweb_client", None)  # as if cdm-ood[dicomweb] were not installed
    monkeypatch.setitem(sys.modules, "dicomweb_client.api", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'cdm-ood\[dicomweb\]'"):
        DicomWebSource("http://127.0.0.1:1/dicom-web", Spool(tmp_path))


def test_watched_folders_are_read_only_and_each_file_is_taken_once_it_held_still(studies, tmp_path):
    share = tmp_path / "share"
    shutil.copytree(studies["clean"], share / "clean")
    (share / "notes.txt").write_text("not DICOM")
    before = {p: p.read_bytes() for p in share.rglob("*") if p.is_file()}
    spool = Spool(tmp_path / "spool")
    source = FolderSource([share], spool)
    assert source.poll() == 0, "a file is taken only once it held still for a poll"
    shutil.copy(next(studies["echoes"].glob("*.dcm")), share / "late.dcm")  # arrives between two polls
    assert source.poll() == 4 and source.poll() == 1
    assert {p: p.read_bytes() for p in share.rglob("*") if p.is_file() and p.name != "late.dcm"} == before
    late = pydicom.dcmread(share / "late.dcm").SOPInstanceUID
    assert uids(spool.root / "incoming") == uids(studies["clean"]) | {late}
    refused = [e for e in spool.entries() if e["event"] == "refused"]
    assert [Path(e["path"]).name for e in refused] == ["notes.txt"] and "not a DICOM instance" in refused[0]["reason"]
    assert FolderSource([share], spool).poll() == 0, "a restart takes no file twice"
    (share / "clean" / next(iter(sorted(p.name for p in (share / "clean").iterdir())))).write_bytes(
        next(studies["ood"].glob("*.dcm")).read_bytes())  # rewritten with other content  # fmt: skip
    again = FolderSource([share], spool)
    assert again.poll() == 0 and again.poll() == 1


def test_listen_watch_gates_a_series_dropped_into_a_share(checkpoint, studies, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    node = Listener(checkpoint, tmp_path / "spool", tmp_path / "node.log", "--quiet", "1", "--poll", "0.5",
                    "--watch", str(share))  # fmt: skip
    try:
        shutil.copytree(studies["clean"], share / "study")
        (entry,) = wait_for(lambda: decided(tmp_path / "spool"), "a decision", process=node.process)
    finally:
        node.stop()
    assert entry["instances"] == 4 and entry["decision"] == "forward"
    assert uids(share) == uids(studies["clean"]), "the share is left as it was"


def test_by_study_a_series_waits_for_its_whole_study_to_be_quiet(studies, tmp_path):
    spool = Spool(tmp_path / "spool")
    first = next(studies["echoes"].glob("*.dcm")).read_bytes()
    key, sop = series_of(first)
    spool.store(first, key, sop)
    time.sleep(0.3)
    other = SeriesKey(key.study, "1.2.3.4")  # another series of the same study, just arrived
    spool.store(first, other, "1.2.3.4.5")
    assert spool.quiet(0.2) == [key] and spool.quiet(0.2, by_study=True) == []
    time.sleep(0.3)
    assert sorted(spool.quiet(0.2, by_study=True), key=lambda k: k.series) == sorted(
        [key, other], key=lambda k: k.series
    )
