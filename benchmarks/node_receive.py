"""How fast `cdm-ood listen` receives, how its memory grows, and how long a series waits for its verdict.

    python benchmarks/node_receive.py --checkpoint runs/<run>/model.pt [--instances 10000] [--size 512]

Receiving: the real node (a child process, `--quiet` longer than the run, so nothing is gated) is sent
`--instances` CT instances of `--size` x `--size` int16 pixels, `--per-series` to a series, by dcmtk `storescu`
processes at once (as a PACS pushes; on the same cores), a run per number in `--associations`. Prints the table
block `node-receive`: per run the instances, seconds, instances per second, MB per second, the node's memory before
and its peak (VmHWM), and for the last run the node's resident memory (VmRSS from /proc) as each tenth of the
instances arrived; each memory figure is the sum over the node's process and its receiver processes.

Latency: a fresh node with `--quiet` Q is sent one series of `--latency-slices` instances; the time from the last
C-STORE response to its decision in `decisions.jsonl` is the quiet period plus the gating time. Prints the table
block `node-latency`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tables import emit, markdown

from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(pid: int) -> list[int]:
    """A process and its children, grandchildren... (the node and its receiver processes)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [pid, *(p for child in children for p in processes(child))]


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process and its children together, in MiB."""
    total = np.zeros(2)
    for member in processes(pid):
        lines = Path(f"/proc/{member}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        total += [int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")]
    return tuple(total)


class Node:
    def __init__(self, checkpoint: Path, spool: Path, quiet: float) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "cdm_ood.cli", "listen", "--checkpoint", str(checkpoint), "--spool",
                   str(spool), "--host", "127.0.0.1", "--port", str(self.port), "--quiet", str(quiet),
                   "--no-mlflow"]  # fmt: skip
        self.log = (spool.parent / f"{spool.name}.log").open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while not self.answers():
            if self.process.poll() is not None or time.time() > deadline:
                sys.exit(f"the node did not start: {(spool.parent / f'{spool.name}.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def answers(self) -> bool:
        """Whether the node answers a C-ECHO."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="BENCH")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="CDMOOD")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return getattr(status, "Status", None) == 0

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()


def template(folder: Path, size: int) -> Path:
    """One CT phantom slice of `size` x `size` as a DICOM file."""
    write_dicom_series(phantom_volume(np.random.default_rng(0), size=size, slices=1), folder, modality="ct",
                       volume_index=0)  # fmt: skip
    return next(folder.glob("*.dcm"))


def send(port: int, path: Path, n: int, per_series: int, associations: int = 1) -> list[subprocess.Popen]:
    """Start dcmtk `storescu` senders, `associations` of them at once, that C-STORE `path` `n` times in all, each
    time with a new SOP instance UID and a new series every `per_series` instances (`--repeat`, `+IR`)."""
    shares = [n // associations + (k < n % associations) for k in range(associations)]
    return [subprocess.Popen(["storescu", "-aec", "CDMOOD", "--repeat", str(share), "+IR", str(per_series),
                              "127.0.0.1", str(port), str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for share in shares if share]  # fmt: skip


def finish(senders: list[subprocess.Popen]) -> None:
    for sender in senders:
        out, _ = sender.communicate()
        if sender.returncode:
            sys.exit(f"storescu failed: {out.decode()[-2000:]}")


def stored(spool: Path) -> int:
    return sum(len(os.listdir(series)) for study in os.scandir(spool / "incoming") if not study.name.startswith(".")
               for series in os.scandir(study))  # fmt: skip


def receive_once(args: argparse.Namespace, path: Path, spool: Path, associations: int) -> tuple[list, list]:
    """One receiving run into a fresh node: its table row, and its memory as each tenth of the instances arrived."""
    node = Node(args.checkpoint, spool, quiet=3600)
    marks: list[list[str]] = []
    step = max(1, args.instances // 10)
    try:
        before, _ = memory(node.process.pid)
        start = time.perf_counter()
        senders = send(node.port, path, args.instances, args.per_series, associations)
        while any(sender.poll() is None for sender in senders):
            count, (rss, _) = stored(spool), memory(node.process.pid)
            if count >= step * (len(marks) + 1):
                marks.append([str(count), f"{rss:.0f} MiB"])
                print(f"{associations} senders: {count} instances received, node resident memory {rss:.0f} MiB",
                      file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(1.0)  # listing the spool costs the cores the node needs: not more often
        finish(senders)
        seconds = time.perf_counter() - start
        rss, peak = memory(node.process.pid)
        if not marks or marks[-1][0] != str(args.instances):
            marks.append([str(args.instances), f"{rss:.0f} MiB"])
    finally:
        node.stop()
    if stored(spool) != args.instances:
        sys.exit(f"{stored(spool)} of {args.instances} instances in the spool")
    megabytes = args.instances * args.size * args.size * 2 / 1e6
    row = [associations, args.instances, f"{seconds:.1f}", f"{args.instances / seconds:.0f}",
           f"{megabytes / seconds:.0f}", f"{before:.0f} MiB", f"{peak:.0f} MiB"]  # fmt: skip
    return row, marks


def receive(args: argparse.Namespace, tmp: Path) -> None:
    path = template(tmp / "template", args.size)
    rows, marks = [], []
    for associations in args.associations:
        row, marks = receive_once(args, path, tmp / f"spool-{associations}", associations)
        rows.append(row)
        shutil.rmtree(tmp / f"spool-{associations}")
    header = ["senders at once", "instances", "seconds", "instances/s", "MB/s of pixels", "node memory before",
              "peak (VmHWM)"]  # fmt: skip
    emit("node-receive", markdown(header, rows) + "\n\n" + markdown(["instances received", "node resident memory"],
                                                                       marks) + (
        f"\n\n{args.size}x{args.size} int16 CT instances, {args.per_series} per series, sent by dcmtk `storescu` "
        "processes at once (one association each) on the same cores, a fresh node for each row; each instance written "
        "to the spool with fsync before its response; nothing gated during the run (`--quiet 3600`). The memory "
        f"table is the run with {args.associations[-1]} senders."))  # fmt: skip


def latency(args: argparse.Namespace, tmp: Path) -> None:
    path = template(tmp / "template-latency", args.size)
    node = Node(args.checkpoint, tmp / "spool-latency", quiet=args.quiet)
    try:
        finish(send(node.port, path, args.latency_slices, args.latency_slices))
        sent = time.time()
        log = tmp / "spool-latency" / "decisions.jsonl"
        while not log.exists() or '"decided"' not in log.read_text():
            if time.time() - sent > 1800:
                sys.exit("no decision within 30 minutes")
            time.sleep(0.1)
        waited = time.time() - sent
        entry = json.loads(log.read_text().splitlines()[0])
    finally:
        node.stop()
    emit("node-latency", markdown(["quiet period", "instances", "from the last instance to the verdict", "decision"],
                                  [[f"{args.quiet:g} s", args.latency_slices, f"{waited:.1f} s", entry["decision"]]])
         + f"\n\nOne series of {args.size}x{args.size} CT instances; the time includes the quiet period, the "
         "gate (`run_gate`: reading, scoring, volume checks, maps, SR and Parametric Map) and the decision "
         "line.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--per-series", type=int, default=200)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4, 8],
                        help="storescu senders at once, a run for each.")  # fmt: skip
    parser.add_argument("--quiet", type=float, default=5.0)
    parser.add_argument("--latency-slices", type=int, default=64)
    args = parser.parse_args()
    args.checkpoint = args.checkpoint.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        receive(args, Path(tmp))
        latency(args, Path(tmp))


if __name__ == "__main__":
    main()
