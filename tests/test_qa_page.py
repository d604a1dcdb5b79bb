"""The run's QA page (`cdm_ood.ood.qa_page`): what it says, what it hides, and how it looks in a real browser."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import PATIENT
from PIL import Image
from processes import cdm, system_tool

from cdm_ood.ood.map_outputs import overlay_index
from cdm_ood.ood.qa_page import CSP, MONTAGE_SLICES, TILE, RunPage, pseudonym, render

VOLUMES = [
    {"level": "volume", "path": "/scans/a", "volume": "/scans/a", "score": 1.0, "verdict": "in", "reason": ""},
    {"level": "volume", "path": "/scans/b", "volume": "/scans/b", "score": 9.0, "verdict": "ood",
     "reason": "score above threshold"},
    {"level": "volume", "path": "/scans/</script><c>", "volume": "/scans/</script><c>", "score": None,
     "verdict": "flagged", "reason": "not scored: constant pixels"},
]  # fmt: skip
FILES = [{"level": "file", "path": "/scans/broken.dcm", "volume": None, "score": None, "verdict": "unreadable",
          "reason": "truncated DICOM"}]  # fmt: skip


def slices(volume: str, scores: list[float]) -> list[dict]:
    return [{"level": "slice", "path": volume, "slice": k, "volume": volume, "score": s, "threshold": 5.0,
             "verdict": "ood" if s > 5 else "in", "reason": ""} for k, s in enumerate(scores)]  # fmt: skip


def test_the_page_counts_orders_escapes_and_embeds_everything(tmp_path):
    overlays = []
    for k in range(10):
        path = tmp_path / f"b_s{k:04d}_map.png"
        Image.fromarray(np.full((32, 48, 3), 25 * k, np.uint8)).save(path)
        overlays.append((k, path))
    rows = [*VOLUMES, *FILES, *slices("/scans/b", [float(k) for k in range(10)])]
    page = render(RunPage("run", rows, {"threshold": 5.0, "detector": "map"}, 1, 2.5, np.arange(20.0),
                          {"/scans/b": overlays}))  # fmt: skip
    counts = dict(re.findall(r'data-count="([\w-]+)">(\d+)<', page))
    assert counts == {"in": "1", "ood": "1", "flagged": "1", "file-unreadable": "1", "file-flagged": "0"}
    table = page[page.index('id="volumes"') :]
    assert table.index("/scans/&lt;/script&gt;&lt;c&gt;") < table.index("/scans/b") < table.index("/scans/a")
    assert "<c>" not in page and "truncated DICOM" in page and f'content="{CSP}"' in page
    assert not re.search(r'(src|href)="(?!data:)', page), "nothing is fetched: every image is a data: URI"
    (montage,) = re.findall(r'class="montage"[^>]*src="data:image/jpeg;base64,([^"]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(montage))) as image:
        assert image.size == (TILE * MONTAGE_SLICES, TILE)
    assert "slices 2, 3, 4, 5, 6, 7, 8, 9 (the worst 8" in page, "the worst slices by score, in slice order"
    data = json.loads(re.search(r'id="volume-data">(.*?)</script>', page)[1])
    assert [row[0] for row in data] == ["flagged", "ood", "in"] and data[0][1] == "/scans/</script><c>"
    assert "exit code" in page and "2.5 s" in page


def test_pseudonyms_replace_every_path_and_volume(tmp_path):
    key = b"k" * 32
    page = render(RunPage("run", [*VOLUMES, *FILES], {"threshold": 5.0}, pseudonym_key=key))
    assert "/scans/" not in page
    assert pseudonym("/scans/b", key) in page and pseudonym("/scans/b", key) == pseudonym("/scans/b", key)
    assert pseudonym("/scans/b", key) != pseudonym("/scans/b", b"x" * 32)


def test_overlay_index_finds_each_volumes_slice_overlays(tmp_path):
    for name in ("ct_s0000_map.png", "ct_s0001_map.png", "mr_t1_s0002_map.png", "ct_s0000_map.npy", "x.png"):
        (tmp_path / name).write_bytes(b"")
    found = overlay_index(tmp_path, {"1.2.3": "ct", "/in/mr.nii.gz": "mr"})
    assert sorted(found["1.2.3"]) == [(0, tmp_path / "ct_s0000_map.png"), (1, tmp_path / "ct_s0001_map.png")]
    assert found["/in/mr.nii.gz"] == [(2, tmp_path / "mr_t1_s0002_map.png")]


@pytest.fixture(scope="module")
def run(checkpoint, scans, tmp_path_factory) -> Path:
    """`cdm-ood score --maps` on clean, OOD, flagged and unreadable inputs: its report, maps and page."""
    out = tmp_path_factory.mktemp("page")
    done = cdm("score", scans, "--checkpoint", checkpoint, "--out", out / "report.csv", "--maps", out / "maps",
               "--no-mlflow", cwd=out)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["html"] == str(out / "report.html")
    return out


def test_score_with_maps_writes_the_page_beside_the_report_and_it_holds_every_input(run, scans):
    page = (run / "report.html").read_text()
    with open(run / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["level"] in ("volume", "file") and row["verdict"] != "ignored":
            assert row["path"] in page or row["volume"] in page, row["path"]
    assert not any(value in page for value in PATIENT.values()), "no patient identifier on the page"
    assert 'class="montage"' in page, "a volume that did not pass shows its maps"


class Proxy:
    """An HTTP proxy that answers nothing and records the host of every request sent to it."""

    BROWSER_OWN = re.compile(r"(^|\.)(google\.com|gstatic\.com|googleapis\.com|gvt1\.com)(:\d+)?$")  # its updates

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.hosts: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    head = connection.recv(4096).decode("latin-1")
                except OSError:  # a preconnect that never sends a request
                    continue
            if head:  # an empty one: a speculative connection, closed without a request
                self.hosts += re.findall(r"^Host: (\S+)", head, re.M) or [head[:80]]

    def page_requests(self) -> list[str]:
        """The hosts requested other than the browser's own services."""
        return [h for h in self.hosts if not self.BROWSER_OWN.search(h)]


def test_the_page_renders_in_chromium_without_a_request_or_a_broken_image(run, tmp_path):
    chromium = system_tool("chromium", "chromium")

    def browse(proxy: Proxy, *args: str) -> subprocess.CompletedProcess:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                 f"--proxy-server=http://127.0.0.1:{proxy.server.getsockname()[1]}", "--proxy-bypass-list=<-loopback>",
                 "--virtual-time-budget=5000"]  # fmt: skip
        return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)

    leaky, caught = tmp_path / "leaky.html", Proxy()  # the proxy sees what a page fetches: one that fetches is caught
    leaky.write_text('<!DOCTYPE html><html><body><img src="http://pacs.example/x.png"></body></html>')
    browse(caught, "--dump-dom", leaky.as_uri())
    assert "pacs.example" in caught.page_requests()
    page, proxy = run / "report.html", Proxy()
    dom = browse(proxy, "--dump-dom", page.as_uri())
    shot = browse(proxy, "--window-size=1280,1600", f"--screenshot={run / 'page.png'}", page.as_uri())
    assert proxy.page_requests() == [], "the page fetches nothing"
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', dom.stdout)
    assert body is not None, dom.stdout[:2000]
    assert int(body[1]) > 0 and body[2] == "0", "every image decoded"
    with open(run / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    volumes = [r for r in rows if r["level"] == "volume"]
    assert dom.stdout.count("<tr class=") == len(volumes)
    unread = [r for r in rows if r["level"] == "file" and r["verdict"] in ("unreadable", "flagged")]
    assert unread and all(html.escape(r["path"]) in dom.stdout for r in [*volumes, *unread]), "every input shown"
    assert all(html.escape(r["volume"]) in dom.stdout for r in volumes)
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', dom.stdout))
    assert {v: int(counts[v]) for v in ("in", "ood", "flagged")} == {
        v: sum(r["verdict"] == v for r in volumes) for v in ("in", "ood", "flagged")
    }
    with Image.open(run / "page.png") as image:
        assert image.size == (1280, 1600) and np.asarray(image.convert("L")).std() > 10, "a page, not a blank"


def test_a_page_inside_the_scanned_folder_is_never_scored_and_a_short_key_is_refused(checkpoint, scans, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "clean.nii.gz").write_bytes((scans / "clean.nii.gz").read_bytes())
    (tmp_path / "short.key").write_bytes(b"1234")
    refused = cdm("score", tmp_path / "in", "--checkpoint", checkpoint, "--html", tmp_path / "in" / "page.html",
                  "--pseudonym-key", tmp_path / "short.key", "--no-mlflow", cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2 and "at least 16 bytes" in refused.stderr
    for _ in range(2):  # the second run finds the first one's page in the folder it scans
        done = cdm("score", tmp_path / "in", "--checkpoint", checkpoint, "--out", tmp_path / "in" / "r.csv",
                   "--html", tmp_path / "in" / "page.html", "--no-mlflow", cwd=tmp_path)  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        with open(tmp_path / "in" / "r.csv", newline="") as f:
            assert {Path(r["path"]).name for r in csv.DictReader(f)} == {"clean.nii.gz"}
    assert (tmp_path / "in" / "page.previous.html").is_file(), "the previous run's page is moved aside"
