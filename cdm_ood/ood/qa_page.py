"""A run's QA page: one self-contained HTML file that answers at a glance what was gated, what failed and why, and
where in each failing scan (`cdm-ood score --html`, each batch of `cdm-ood listen`; `evaluation_page` for
`cdm-ood evaluate`).

- Summary: counts of passed / OOD / flagged / unreadable volumes and files, how the threshold was set (detector,
  calibrated false-positive rate, model digest), the exit code and time, and the scores' histogram with the
  threshold and the calibration's in-distribution scores (inline SVG).
- The volumes, worst first, in a table that sorts by any column and filters by verdict (a few lines of inline
  script over the page's data; the worst `TABLE_ROWS` are rows when it opens), with the reason in words.
- For each volume that did not pass (the worst `MAX_MONTAGES`) and a few that passed: a montage of its worst slices
  with the anomaly map overlaid and the map's colour bar (from `score --maps`), the per-slice score profile against
  the calibration's in-distribution band, and the volume checks' statistics against their thresholds.
- The unreadable and flagged files, each with its reason.

Images are embedded as data: URIs and a Content-Security-Policy allows no request, so the page works from a file
share or an MLflow artifact view and never reaches the network. It names files as the report does (paths), or by
pseudonyms (`pseudonym`: a keyed hash) for sharing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..utils.io import atomic_write
from .map_outputs import COLORMAP, SCORE_DISPLAY
from .report import FAILING, FLAGGED, IN, OOD, UNREADABLE
from .volume_checks import STATISTICS

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
TABLE_ROWS = 500  # volumes in the table when the page opens (all on request: a long table is slow to lay out)
MAX_MONTAGES = 200  # failing volumes shown with montage and profile, worst first (all are in the table)
PASSED_SAMPLE = 3  # passed volumes shown the same way, for comparison
MONTAGE_SLICES = 8  # the worst slices of a volume in its montage
TILE = 128  # pixels of a montage tile's longer side
JPEG_QUALITY = 80  # of a montage: smooth overlays, far smaller than as PNG
BAND = (0.05, 0.95)  # the calibration's in-distribution band of a slice score profile (quantiles)
_RANK = {UNREADABLE: 0, FLAGGED: 1, OOD: 2, IN: 3}  # worst first
_COLOURS = {IN: "#2e7d32", OOD: "#c62828", FLAGGED: "#ef6c00", UNREADABLE: "#6a1b9a", "calibration": "#1565c0"}


@dataclass
class RunPage:
    """What a page shows: the report's `rows` and `meta` (detector, threshold, checkpoint digest...), the command's
    exit code and seconds, the detector's in-distribution `calibration` scores, each volume's slice overlays
    (volume id -> [(slice, PNG)], `map_outputs.overlay_index`) and the key that turns paths into pseudonyms."""

    title: str
    rows: Sequence[dict]
    meta: Mapping[str, Any]
    exit_code: Optional[int] = None
    seconds: Optional[float] = None
    calibration: Optional[np.ndarray] = None
    overlays: Mapping[str, Sequence[tuple[int, Path]]] = field(default_factory=dict)
    pseudonym_key: Optional[bytes] = None


def pseudonym(text: str, key: bytes) -> str:
    """A stable stand-in for a path or volume id: the first 12 hex digits of its HMAC-SHA256 under `key`."""
    return "id-" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:12]


def write_page(path: str | Path, page: RunPage | str) -> Path:
    """Write `page` (rendered by `render`, or the HTML of `evaluation_page`) to `path` atomically."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(page if isinstance(page, str) else render(page))
    return path


def render(page: RunPage) -> str:
    """The page's HTML (see the module)."""
    name = _namer(page.pseudonym_key)
    volumes = sorted((r for r in page.rows if r["level"] == "volume"), key=_worst_first)
    files = [r for r in page.rows if r["level"] == "file" and r["verdict"] in FAILING]
    slices = _slices_by_volume(page.rows)
    failing = [v for v in volumes if v["verdict"] != IN]
    shown = failing[:MAX_MONTAGES] + [v for v in volumes if v["verdict"] == IN][:PASSED_SAMPLE]
    band = _band(page.calibration)
    body = [
        f"<h1>{_e(page.title)}</h1>",
        _summary(page, volumes, files),
        _histogram(page, volumes, slices),
        _volume_table(volumes, name),
        "<h2>Volumes that did not pass</h2>" if failing else "<h2>Volumes</h2>",
        *(_volume_detail(v, slices.get(v["volume"], []), page, band, name) for v in shown),
        _more(len(failing) - MAX_MONTAGES),
        _file_list(files, name),
    ]
    style = _STYLE + _colour_bar_style()
    return _TEMPLATE.format(csp=CSP, title=_e(page.title), style=style, body="\n".join(body), script=_SCRIPT)


def evaluation_page(title: str, meta: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]],
                    figures: Sequence[Path]) -> str:  # fmt: skip
    """The page of an evaluation (`cdm-ood evaluate`): the model, every metrics row and the figures (PNG, embedded),
    in the same self-contained form as `render`."""
    facts = _facts(meta.items())
    columns = list(metrics[0]) if metrics else []
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in metrics)
    images = "".join(f'<figure><img alt="{_e(f.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(f.read_bytes()).decode()}"><figcaption>{_e(f.name)}</figcaption></figure>'
                     for f in figures)  # fmt: skip
    content = (
        f'<h1>{_e(title)}</h1><table class="facts">{facts}</table><h2>Metrics</h2>'
        f'<table id="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{images}'
    )
    return _TEMPLATE.format(csp=CSP, title=_e(title), style=_STYLE, body=content, script=_SCRIPT)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _facts(pairs: Iterable[tuple[str, Any]]) -> str:
    """Table rows of the (name, value) pairs whose value is known."""
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs if v is not None)


def _namer(key: Optional[bytes]) -> Callable[[Optional[str]], str]:
    return (lambda text: "" if text is None else pseudonym(text, key)) if key else (lambda text: text or "")


def _worst_first(row: Mapping[str, Any]) -> tuple[int, float]:
    score = row.get("score")
    return _RANK.get(row["verdict"], 4), -(score if isinstance(score, float) and math.isfinite(score) else math.inf)


def _slices_by_volume(rows: Sequence[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in rows:
        if row["level"] == "slice":
            found.setdefault(row["volume"], []).append(row)
    return found


def _band(calibration: Optional[np.ndarray]) -> Optional[tuple[float, float]]:
    if calibration is None:
        return None
    finite = np.asarray(calibration, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return (float(np.quantile(finite, BAND[0])), float(np.quantile(finite, BAND[1]))) if len(finite) else None


def _fmt(value: Any) -> str:
    """`_cell`, escaped for HTML."""
    return _e(_cell(value))


def _summary(page: RunPage, volumes: Sequence[dict], files: Sequence[dict]) -> str:
    counts = Counter(v["verdict"] for v in volumes)
    file_counts = Counter(f["verdict"] for f in files)
    cards = "".join(
        f'<div class="card {verdict}"><b data-count="{verdict}">{counts[verdict]}</b> {label}</div>'
        for verdict, label in ((IN, "passed"), (OOD, "OOD"), (FLAGGED, "flagged"))
    ) + (f'<div class="card unreadable"><b data-count="file-unreadable">{file_counts[UNREADABLE]}</b> unreadable '
         f'files</div><div class="card flagged"><b data-count="file-flagged">{file_counts[FLAGGED]}</b> flagged '
         "files</div>")  # fmt: skip
    meta = page.meta
    facts = [
        ("threshold", f"{_fmt(meta.get('threshold'))} ({meta.get('threshold_source', 'calibrated')})"),
        ("detector", meta.get("detector")),
        ("per volume", meta.get("per_volume")),
        (
            "volume checks",
            ", ".join(
                f"{name} above {_fmt(value)}" for name, value in (meta.get("volume_check_thresholds") or {}).items()
            )
            or None,
        ),
        ("model", meta.get("checkpoint_digest")),
        ("training run", meta.get("training_run")),
        ("exit code", page.exit_code),
        ("time", None if page.seconds is None else f"{page.seconds:.1f} s"),
        ("finished", meta.get("finished")),
    ]
    rows = _facts(facts)
    return f'<section class="summary"><div class="cards">{cards}</div><table class="facts">{rows}</table></section>'


def _histogram(page: RunPage, volumes: Sequence[dict], slices: Mapping[str, list[dict]]) -> str:
    """The scores of the unit the threshold applies to (slices, or volumes for a 3D model), by verdict, over the
    calibration's in-distribution scores, with the threshold."""
    unit = [r for rows in slices.values() for r in rows] or list(volumes)
    sets = {v: [r["score"] for r in unit if r["verdict"] == v and isinstance(r["score"], float)] for v in (IN, OOD)}
    if page.calibration is not None:
        sets["calibration"] = [float(s) for s in page.calibration if math.isfinite(s)]
    threshold = page.meta.get("threshold")
    values = [s for v in sets.values() for s in v if math.isfinite(s)]
    if not values:
        return "<p>No score to plot.</p>"
    marked = isinstance(threshold, float) and math.isfinite(threshold)
    lo, hi = min([*values, *([threshold] if marked else [])]), max([*values, *([threshold] if marked else [])])
    edges = np.linspace(lo, hi + 1e-9 * max(1.0, abs(hi)), 41)
    width, height, pad = 640, 220, 30
    x = _scale(lo, edges[-1], pad, width - 10)
    parts = []
    for name, scores in sets.items():
        if not scores:
            continue
        counts, _ = np.histogram(np.clip(scores, edges[0], edges[-1]), edges)
        density = counts / counts.sum()
        y = _scale(0.0, 1.0, height - pad, 10)
        top = max(float(density.max()), 1e-9)
        heights = np.r_[density, density[-1]] / top
        points = " ".join(f"{x(e):.1f},{y(d):.1f}" for e, d in zip(edges, heights, strict=True))
        style = "fill:none;stroke-dasharray:4 3" if name == "calibration" else "fill-opacity:0.25"
        parts.append(f'<polyline points="{x(edges[0]):.1f},{height - pad} {points} {x(edges[-1]):.1f},'
                     f'{height - pad}" style="stroke:{_COLOURS[name]};fill:{_COLOURS[name]};{style}"/>')  # fmt: skip
    if marked:
        parts.append(f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="10" y2="{height - pad}" '
                     'stroke="black" stroke-dasharray="6 3"/>')  # fmt: skip
    legend = " ".join(f'<span style="color:{_COLOURS[n]}">&#9632; {n} ({len(s)})</span>' for n, s in sets.items())
    axis = (f'<text x="{pad}" y="{height - 8}">{lo:.4g}</text><text x="{width - 10}" y="{height - 8}" '
            f'text-anchor="end">{hi:.4g}</text>')  # fmt: skip
    return (
        f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="score histogram">{"".join(parts)}{axis}</svg><figcaption>{_e(page.meta.get("detector"))} '
        f"scores, each set scaled to its own peak; dashed line: the threshold. {legend}</figcaption></figure>"
    )


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _cell(value: Any) -> str:
    """A table cell's text: a float to 4 significant digits, nothing for None."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _volume_table(volumes: Sequence[dict], name: Callable[[Optional[str]], str]) -> str:
    """Every volume in the page's data (JSON, for the script's sorting and filtering), the worst `TABLE_ROWS` also
    as table rows, so the page opens fast and reads without a script."""
    buttons = "".join(f'<button data-filter="{v}">{v}</button>' for v in ("all", IN, OOD, FLAGGED))
    head = "".join(f"<th>{c}</th>" for c in ("verdict", "volume", "path", "part", "score", "threshold", "reason"))
    cells = [[_cell(c) for c in (v["verdict"], name(v["volume"]), "" if v["path"] == v["volume"] else name(v["path"]),
                                 v.get("series_part"), v.get("score"), v.get("threshold"), v.get("reason"))]
             for v in volumes]  # fmt: skip
    body = "".join(f'<tr class="{_e(row[0])}">' + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                   for row in cells[:TABLE_ROWS])  # fmt: skip
    data = json.dumps(cells).replace("<", "\\u003c")
    more = len(cells) > TABLE_ROWS
    return (
        f'<h2>Volumes ({len(volumes)}), worst first</h2><div class="filters">{buttons}</div>'
        f'<table id="volumes"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<p class="note"{"" if more else " hidden"}>The worst {TABLE_ROWS} of {len(cells)} volumes; all are in '
        f'the report. <button id="more-rows">show all</button></p>'
        f'<script type="application/json" id="volume-data">{data}</script>'
    )


def _volume_detail(
    volume: Mapping[str, Any], slices: Sequence[dict], page: RunPage, band: Optional[tuple[float, float]],
    name: Callable[[Optional[str]], str],
) -> str:  # fmt: skip
    overlays = page.overlays.get(volume["volume"], [])
    if overlays:
        montage = _montage(slices, overlays)
    elif volume.get("score") is None:
        montage = '<p class="note">No slice of it was scored, so it has no anomaly map.</p>'
    else:
        montage = '<p class="note">No anomaly maps for this volume (`score --maps` draws them).</p>'
    checks = "".join(f"<tr><th>{c}</th><td>{_fmt(volume.get(c))}</td></tr>" for c in STATISTICS
                     if volume.get(c) is not None)  # fmt: skip
    return (
        f'<section class="volume {_e(volume["verdict"])}"><h3>{_e(volume["verdict"])}: '
        f"{_e(name(volume['volume']))}</h3><p>{_e(volume.get('reason'))}</p>"
        f"{montage}{_profile(slices, volume.get('threshold'), band)}"
        f"{f'<table class=facts><caption>volume statistics</caption>{checks}</table>' if checks else ''}"
        "</section>"
    )


def _montage(slices: Sequence[dict], overlays: Sequence[tuple[int, Path]]) -> str:
    """The worst slices' overlays (`score --maps`), as one JPEG of tiles, and the map's colour bar."""
    scores = {r["slice"]: r["score"] for r in slices if isinstance(r.get("score"), float)}
    worst = sorted(overlays, key=lambda item: -scores.get(item[0], -math.inf))[:MONTAGE_SLICES]
    from PIL import Image

    tiles = []
    for _, png in sorted(worst):
        with Image.open(png) as image:
            tile = image.convert("RGB")
            tile.thumbnail((TILE, TILE), reducing_gap=2.0)
            tiles.append(tile)
    sheet = Image.new("RGB", (TILE * len(tiles), TILE), "black")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (k * TILE + (TILE - tile.width) // 2, (TILE - tile.height) // 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    labels = ", ".join(str(index) for index, _ in sorted(worst))
    return (
        f'<figure><img class="montage" alt="anomaly map overlays of slices {labels}" '
        f'loading="lazy" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">{_colour_bar()}'
        f"<figcaption>slices {labels} (the worst {len(worst)} by score)</figcaption></figure>"
    )


def _colour_bar_style() -> str:
    """The CSS of the anomaly map's colour bar: `map_outputs.COLORMAP` as a gradient."""
    from matplotlib import colormaps

    stops = ",".join(f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f})"
                     for r, g, b, _ in colormaps[COLORMAP](np.linspace(0, 1, 9)))  # fmt: skip
    return f".colourbar{{width:200px;height:12px;margin-top:4px;background:linear-gradient(to right,{stops})}}"


def _colour_bar() -> str:
    lo, hi = SCORE_DISPLAY
    return (
        '<div class="colourbar" role="img" aria-label="colour bar of the anomaly map"></div>'
        f'<div class="note">map {lo:g} to {hi:g} deviations: clear at {lo:g}, full colour at {hi:g}</div>'
    )


def _profile(slices: Sequence[dict], threshold: Any, band: Optional[tuple[float, float]]) -> str:
    """Each slice's score in slice order, over the calibration's in-distribution band, with the threshold."""
    points = sorted((r["slice"], r["score"]) for r in slices if isinstance(r.get("score"), float)
                    and math.isfinite(r["score"]) and r.get("slice") is not None)  # fmt: skip
    if len(points) < 2:
        return ""
    width, height, pad, left = 640, 160, 24, 56
    values = [s for _, s in points] + [*(band or ()), *([threshold] if isinstance(threshold, float) else [])]
    y = _scale(min(values), max(values), height - pad, 8)
    x = _scale(points[0][0], points[-1][0], left, width - 8)
    parts = []
    if band is not None:
        parts.append(
            f'<rect x="{left}" y="{y(band[1]):.1f}" width="{width - 8 - left}" '
            f'height="{max(0.5, y(band[0]) - y(band[1])):.1f}" fill="#1565c0" fill-opacity="0.15"/>'
        )
    if isinstance(threshold, float) and math.isfinite(threshold):
        parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                     'stroke="black" stroke-dasharray="6 3"/>')  # fmt: skip
    parts.append(f'<text x="0" y="14">{max(values):.4g}</text><text x="0" y="{height - pad}">{min(values):.4g}</text>')
    parts.append('<polyline fill="none" stroke="#c62828" points="'
                 + " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in points) + '"/>')  # fmt: skip
    return (
        f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="slice score profile">{"".join(parts)}<text x="{left}" y="{height - 6}">slice '
        f'{points[0][0]}</text><text x="{width - 8}" y="{height - 6}" text-anchor="end">slice {points[-1][0]}'
        "</text></svg><figcaption>slice scores in slice order; band: the calibration's in-distribution "
        f"{BAND[0]:.0%} to {BAND[1]:.0%}; dashed line: the threshold.</figcaption></figure>"
    )


def _more(hidden: int) -> str:
    return f'<p class="note">{hidden} more volumes did not pass; they are in the table.</p>' if hidden > 0 else ""


def _file_list(files: Sequence[dict], name: Callable[[Optional[str]], str]) -> str:
    if not files:
        return "<h2>Files not scored</h2><p>None.</p>"
    items = "".join(f'<li class="{_e(f["verdict"])}"><b>{_e(f["verdict"])}</b> {_e(name(f["path"]))}: '
                    f'{_e(f.get("reason"))}</li>' for f in files)  # fmt: skip
    return f'<h2>Files not scored ({len(files)})</h2><ul id="files">{items}</ul>'


_STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.5em}
.cards{display:flex;gap:1em;margin:1em 0}.card{padding:.6em 1em;border-radius:6px;background:#f4f4f4}
.card b{font-size:1.6em;display:block}.card.in b{color:#2e7d32}.card.ood b{color:#c62828}
.card.flagged b{color:#ef6c00}.card.unreadable b{color:#6a1b9a}table{border-collapse:collapse;margin:.5em 0}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
#volumes th{cursor:pointer;background:#eee}#volumes{width:100%}
#volumes td:nth-child(2),#volumes td:nth-child(3){word-break:break-all;min-width:16em;max-width:26em}
#volumes td:last-child{min-width:20em}
tr.ood td:first-child{color:#c62828}
tr.flagged td:first-child{color:#ef6c00}tr.in td:first-child{color:#2e7d32}.filters button{margin-right:.4em}
section.volume{border-left:4px solid #ccc;padding-left:1em;margin:1.5em 0}section.volume.ood{border-color:#c62828}
section.volume.flagged{border-color:#ef6c00}section.volume.in{border-color:#2e7d32}.note{color:#666}
img.montage{image-rendering:pixelated;max-width:100%}figure{margin:.5em 0}svg text{font-size:11px}"""

_SCRIPT = """const source=document.getElementById('volume-data');if(source){
const data=JSON.parse(source.textContent);
const body=document.querySelector('#volumes tbody'),more=document.getElementById('more-rows');
let shown=data,limit=body.rows.length;
function draw(){body.replaceChildren(...shown.slice(0,limit).map(v=>{const tr=document.createElement('tr');
tr.className=v[0];v.forEach(c=>{const td=document.createElement('td');td.textContent=c;tr.appendChild(td)});
return tr}));more.parentElement.hidden=shown.length<=limit}
document.querySelectorAll('.filters button').forEach(b=>b.onclick=()=>{const f=b.dataset.filter;
shown=f==='all'?data:data.filter(v=>v[0]===f);draw()});
document.querySelectorAll('#volumes th').forEach((th,k)=>th.onclick=()=>{const up=th.dataset.up!=='1';
th.dataset.up=up?'1':'0';const key=v=>{const n=parseFloat(v[k]);return isNaN(n)?v[k]:n};
shown=[...shown].sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(up?1:-1)});draw()});
more.onclick=()=>{limit=Infinity;draw()}}
addEventListener('load',()=>{const imgs=[...document.images];document.body.dataset.images=imgs.length;
document.body.dataset.broken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length});"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title><style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""
