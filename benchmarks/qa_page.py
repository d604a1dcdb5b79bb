"""The QA page of a real run, as a person sees it, and how large and how fast the page of a 10,000-volume run is.

    python benchmarks/qa_page.py --checkpoint runs/<run>/model.pt --scans runs/<run>/../data/test \
        [--screenshot docs/images/qa-page.png] [--volumes 10000]

Real run: `cdm-ood score --maps` on `--scans` (the demo's held-out clean and corrupted series), its page
opened in headless Chromium (the Debian package) and saved as the screenshot `--screenshot`. Prints the table block
`qa-page-demo`: volumes, pages size, Chromium's time to load it and take the screenshot.

Large run: a report of `--volumes` volumes of `--slices` slices each, one in 20 OOD, every failing volume with the
real run's overlays as its maps; prints the table block `qa-page-size`: the page's size, the time to render it
(`qa_page.render`) and Chromium's time to load it to its `load` event (the time of an empty page subtracted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tables import emit, markdown

from cdm_ood.ood.qa_page import MAX_MONTAGES, RunPage, render


def chromium(*args: str) -> float:
    """Seconds headless Chromium takes for `args` (it exits once the page has loaded)."""
    browser = shutil.which("chromium")
    if browser is None:
        sys.exit("chromium is not installed (Debian package chromium; `make system-tools`)")
    start = time.perf_counter()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking"]  # fmt: skip
    subprocess.run([browser, *flags, *args], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def real_run(args: argparse.Namespace, tmp: Path) -> list[tuple[int, Path]]:
    out = tmp / "run"
    done = subprocess.run([sys.executable, "-m", "cdm_ood.cli", "score", str(args.scans), "--checkpoint",
                           str(args.checkpoint), "--out", str(out / "report.csv"), "--maps", str(out / "maps"),
                           "--no-mlflow"], capture_output=True, text=True)  # fmt: skip
    if done.returncode not in (0, 1):
        sys.exit(f"score failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.splitlines()[-1])
    page = Path(summary["html"])
    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    seconds = chromium("--window-size=1280,3600", "--hide-scrollbars", f"--screenshot={args.screenshot}", page.as_uri())
    with Image.open(args.screenshot) as shot:  # 256 colours: a far smaller file for the repository
        shot.convert("RGB").quantize(256).save(args.screenshot, optimize=True)
    volumes = sum(v for k, v in summary.items() if k.startswith("volume_"))
    emit("qa-page-demo", markdown(["volumes", "page size", "Chromium: load and screenshot"],
                                  [[volumes, f"{page.stat().st_size / 1e6:.2f} MB", f"{seconds:.1f} s"]])
         + f"\n\nThe page of `cdm-ood score --maps` on {args.scans.name}/ (the demo's held-out clean and corrupted "
         f"series); its screenshot is `{args.screenshot.as_posix()}`.")  # fmt: skip
    return sorted((int(p.stem.split("_s")[-1].split("_")[0]), p) for p in (out / "maps").glob("*_s*_map.png"))


def large_run(args: argparse.Namespace, tmp: Path, overlays: list[tuple[int, Path]]) -> None:
    rng = np.random.default_rng(0)
    rows, maps = [], {}
    for v in range(args.volumes):
        name, ood = f"/archive/patient{v:05d}/series1", v % 20 == 0
        scores = rng.normal(9.0 if ood else 5.0, 0.5, args.slices)
        rows += [{"level": "slice", "path": name, "slice": k, "volume": name, "score": float(s), "threshold": 7.0,
                  "verdict": "ood" if s > 7 else "in", "reason": ""} for k, s in enumerate(scores)]  # fmt: skip
        rows.append({"level": "volume", "path": name, "volume": name, "score": float(scores.mean()),
                     "threshold": 7.0, "verdict": "ood" if ood else "in",
                     "reason": "score above threshold" if ood else ""})  # fmt: skip
        if ood:
            maps[name] = [(k, overlays[k % len(overlays)][1]) for k in range(args.slices)]
    start = time.perf_counter()
    text = render(RunPage("large run", rows, {"threshold": 7.0, "detector": "map"}, 1, None,
                          rng.normal(5.0, 0.5, 2000), maps))  # fmt: skip
    rendered = time.perf_counter() - start
    page, empty = tmp / "large.html", tmp / "empty.html"
    page.write_text(text)
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    load = chromium("--dump-dom", page.as_uri()) - chromium("--dump-dom", empty.as_uri())
    failing = sum(r["level"] == "volume" and r["verdict"] != "in" for r in rows)
    emit("qa-page-size", markdown(
        ["volumes", "slices", "did not pass", "with montage", "page size", "render (Python)", "Chromium load"],
        [[args.volumes, args.volumes * args.slices, failing, min(failing, MAX_MONTAGES) + 3,
          f"{len(text.encode()) / 1e6:.1f} MB", f"{rendered:.1f} s", f"{load:.1f} s"]],
    ) + f"\n\nA synthetic report of {args.volumes} volumes of {args.slices} slices, one in 20 OOD, each failing "
        "volume with real overlays as its maps. Chromium load: to the page's load event, less an empty page's "
        "time.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--scans", required=True, type=Path)
    parser.add_argument("--screenshot", type=Path, default=Path("docs/images/qa-page.png"))
    parser.add_argument("--volumes", type=int, default=10000)
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overlays = real_run(args, Path(tmp))
        large_run(args, Path(tmp), overlays)


if __name__ == "__main__":
    main()
