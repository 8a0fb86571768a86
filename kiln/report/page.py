"""Kiln's comparison page: per model, the device x precision matrix, every engine's numbers, reasons, figures
and build metadata, as one self-contained HTML file (figures embedded as data URIs) and as Markdown."""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln import paths
from kiln.findings import MISSING, NOT_MEASURABLE, STALE, latency_notes
from kiln.report import plots
from kiln.report.data import Engine, Model, Run, load
from kiln.specs import PRECISIONS
from kiln.util import atomic_path

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- cell formats


def _num(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _signed(v: float) -> str:
    return f"{v:+.4f}"


def _size(v: int) -> str:
    return f"{v / 2**20:.1f} MiB" if v >= 2**20 else f"{v / 2**10:.0f} KiB"


def _speedup(v: float) -> str:
    return f"{v:.2f}x"


# (summary column, header, format). A column shows when the summary has it and some row of the model has a value.
COLUMNS: list[tuple[str, str, Callable]] = [
    ("device", "device", str),
    ("precision", "precision", str),
    ("status", "status", str),
    ("engine_bytes", "engine size", _size),
    ("parity_weakest", "weakest parity part", str),
    ("parity_min_cosine", "min cosine", _num(6)),
    ("detection_match_rate", "detection match", _num(3)),
    ("detection_box_iou", "matched box IoU", _num(3)),
    ("map50_95", "mAP50-95", _num(4)),
    ("map_drop", "mAP50-95 drop vs fp32", _signed),
    ("map50", "mAP50", _num(4)),
    ("map50_drop", "mAP50 drop vs fp32", _signed),
    ("batch_size", "batch", str),
    ("latency_median_ms", "p50 ms", _num(2)),
    ("latency_p99_ms", "p99 ms", _num(2)),
    ("throughput_ips", "images/s", _num(1)),
    ("gpu_compute_median_ms", "GPU compute p50 ms", _num(2)),
    ("pipeline_median_ms", "pipeline p50 ms", _num(2)),
    ("pytorch_latency_median_ms", "PyTorch p50 ms (batch 1)", _num(2)),
    ("speedup_vs_pytorch", "speed-up vs PyTorch", _speedup),
    ("best_streams", "best streams", str),
    ("streams_images_per_s", "images/s at best streams", _num(1)),
    ("latency_given_up", "latency given up vs strict", _signed),
    ("flags", "flags", str),
    ("reason", "reason", str),
]
ALWAYS = {"device", "precision", "status"}
STATUS_NOTE = {"passed": "validated, within every threshold", "failed": "a threshold or the build failed",
               "built": "built here, not validated on this host", "not run": "not built on this host",
               STALE: "a file changed after validation: not validated as it is now", MISSING: "not validated yet",
               NOT_MEASURABLE: "validated, but the reference shows nothing to compare with (no detections, or an "
                               "mAP below validation.min_reference_map)"}


def columns(run: Run, model: Model) -> list[tuple[str, str, Callable]]:
    """The table's columns for a model: those the summary has and that hold a value for one of its rows."""
    return [c for c in COLUMNS if c[0] in ALWAYS or
            (c[0] in run.columns and any(e.row.get(c[0]) is not None for e in model.engines))]


def cell(engine: Engine, key: str, fmt: Callable) -> str:
    v = engine.row.get(key)
    return "" if v is None else fmt(v)


def _precision_order(model: Model) -> list[str]:
    known = [p for p in PRECISIONS if p in model.precisions]
    return known + [p for p in model.precisions if p not in known]


def _matrix_text(e: Engine) -> str:
    """A matrix cell's one-line numbers: accuracy and speed when validated, else the engine size."""
    r = e.row
    if r.get("map50_95") is not None and r.get("latency_median_ms") is not None:
        return f"mAP {r['map50_95']:.4f} · {r['latency_median_ms']:.2f} ms"
    if r.get("engine_bytes") is not None:
        return _size(r["engine_bytes"])
    return ""


def reasons(model: Model) -> list[tuple[str, str, list[str], str]]:
    """(device, status, precisions, reason) for every engine that did not pass, grouped by identical reason."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for e in model.engines:
        if e.status != "passed":
            groups.setdefault((e.device, e.status, e.row.get("reason") or "(no reason recorded)"), []).append(
                e.precision)
    return [(d, s, ps, r) for (d, s, r), ps in groups.items()]


def notes(model: Model) -> list[str]:
    """Warnings the latency measurement raised (a busy host, unstable clocks)."""
    return [f"{e.device}/{e.precision} {note}" for e in model.engines for note in latency_notes(e.validation)]


def _versions(rec: dict) -> str:
    v = rec.get("versions")
    if isinstance(v, dict) and v:
        return ", ".join(f"{k} {val}" for k, val in v.items())
    return f"{rec.get('backend', '')} {rec.get('backend_version', '')}".strip()


def _profiles(rec: dict) -> str:
    out = []
    for prof in rec.get("profiles") or []:
        for name, shapes in prof.items():
            dims = ["x".join(map(str, shapes.get(k, []))) for k in ("min", "opt", "max")]
            out.append(f"{name} {' / '.join(dims)}")
    return "; ".join(out)


def _target(rec: dict) -> str:
    return ", ".join(rec.get("compute_capability_targets") or rec.get("providers") or [])


def _options(rec: dict) -> str:
    opts = rec.get("options")
    if not isinstance(opts, dict):
        return ""
    return ", ".join(f"{k}={v}" for k, v in opts.items() if v not in (None, False, "none"))


# (header, value) of the build metadata table, from engine.json (and the validation host).
META: list[tuple[str, Callable[[Engine], str]]] = [
    ("device", lambda e: e.device),
    ("precision", lambda e: e.precision),
    ("build", lambda e: e.record.get("status", "")),
    ("backend", lambda e: _versions(e.record)),
    ("builder", lambda e: e.record.get("builder") or ""),
    ("build host", lambda e: e.record.get("host") or ""),
    ("build GPU", lambda e: (e.record.get("build_host") or {}).get("gpu") or ""),
    ("validation host", lambda e: (e.validation or {}).get("host") or ""),
    ("target", lambda e: _target(e.record)),
    ("profiles (min / opt / max)", lambda e: _profiles(e.record)),
    ("options", lambda e: _options(e.record)),
    ("build s", lambda e: "" if e.record.get("build_seconds") is None else f"{e.record['build_seconds']:.2f}"),
    ("engine sha256", lambda e: (e.record.get("engine_sha256") or "")[:12]),
]


NOWRAP = {"profiles (min / opt / max)", "build s", "engine sha256"}


def meta_columns(model: Model) -> list[tuple[str, Callable[[Engine], str]]]:
    built = [e for e in model.engines if e.record]
    return [(h, f) for h, f in META if any(f(e) for e in built)]


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    title: str
    path: Path
    data: bytes  # PNG for plots, JPEG for detection pictures
    pictures: bool = False  # detection pictures (shown in their own section), not a plot

    @property
    def mime(self) -> str:
        return "image/jpeg" if self.path.suffix == ".jpg" else "image/png"


TITLES = {"accuracy_latency": "Accuracy vs latency (Pareto front of the engines that passed: dashed, circled)",
          "build_time": "Build time per device", "latency": "Latency distribution per engine",
          "throughput": "Throughput vs batch size",
          "streams": "Throughput vs concurrent streams (best stream count circled)"}


def draw(run: Run, model_plots: str | Path, device_plots: str | Path) -> dict[str, list[Figure]]:
    """Draw every figure the run has data for into the two plots folders (paths.*_IN); model -> figures."""
    model_plots, device_plots = Path(model_plots), Path(device_plots)
    for folder in (model_plots, device_plots):
        folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Figure]] = {}
    for m in run.models:
        figs = out.setdefault(m.name, [])
        for name, fn in plots.MODEL_PLOTS.items():
            png = fn(m)
            if png:
                p = model_plots / paths.fmt(paths.MODEL_PLOT_IN, model=m.name, plot=name)
                figs.append(Figure(TITLES[name], p, png))
        for dev in m.devices:
            for name, fn in plots.DEVICE_PLOTS.items():
                png = fn(m, dev)
                if png:
                    p = device_plots / paths.fmt(paths.DEVICE_PLOT_IN, model=m.name, device=dev, plot=name)
                    figs.append(Figure(f"{TITLES[name]}: {dev}", p, png))
            for name in plots.picture_names(m, dev):
                jpeg = plots.detections_side_by_side(m, dev, name)
                plot = Path(name).stem  # detections_<image id>, as validation named it
                p = device_plots / paths.fmt(paths.DEVICE_PICTURE_IN, model=m.name, device=dev, plot=plot)
                figs.append(Figure(f"{dev}, validation image {plot.split('_', 1)[-1]}: detections per precision", p,
                                   jpeg, pictures=True))
        for f in figs:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(f.path) as tmp:
                tmp.write_bytes(f.data)
    return out


def _figure_gaps(model: Model) -> list[str]:
    """Why a figure is missing, in words."""
    gaps = []
    if not any(e.row.get("map50_95") is not None and e.row.get("latency_median_ms") is not None
               for e in model.engines):
        gaps.append("No accuracy vs latency figure: no engine of this model was validated on this host.")
    unmeasured = [d for d in model.devices if not any(e.latency for e in model.engines if e.device == d)]
    if unmeasured:
        gaps.append(f"No latency or throughput figures for {', '.join(unmeasured)}: "
                    "not validated on this host (reasons above).")
    if not any(e.record and e.record.get("build_seconds") is not None for e in model.engines):
        gaps.append("No build time figure: no engine of this model was built on this host.")
    return gaps


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1b1b1b; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.reason { min-width: 22em; }
.st-passed { background: #dcf5e1; } .st-failed { background: #fbd9d9; }
.st-built { background: #fff1c7; } .st-not-run { background: #ececec; color: #555; }
.st-stale, .st-missing { background: #f3dcf5; } .st-not-measurable { background: #dde8f7; }
.matrix td { min-width: 10em; } .matrix .metric { font-size: 0.85em; color: #333; }
.matrix td.absent { background: #fff; color: #aaa; }
.legend span { display: inline-block; padding: 0.15em 0.6em; margin-right: 0.4em; border: 1px solid #ccc; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
.scroll { overflow-x: auto; } td.nowrap { white-space: nowrap; }
.gap { color: #666; font-style: italic; }
code { font-size: 0.9em; }
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _status_class(status: str) -> str:
    return "st-" + status.replace(" ", "-")


def _rel(target: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), base.resolve())).as_posix()


def _log_links_html(logs: list[tuple[str, Path]], base: Path) -> str:
    return " ".join(f'<a href="{_e(_rel(p, base))}">{_e(rule)}</a>' for rule, p in logs)


def _figure_html(f: Figure, base: Path) -> str:
    data = base64.b64encode(f.data).decode()
    return (f'<figure><img src="data:{f.mime};base64,{data}" alt="{_e(f.title)}">'
            f'<figcaption>{_e(f.title)} (<a href="{_e(_rel(f.path, base))}">{f.path.suffix[1:].upper()}</a>)'
            "</figcaption></figure>")


def _opt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def deploy_front(d: dict) -> str:
    """The Pareto front of one model x device as text: precision (latency, mAP50-95), fastest first."""
    return ", ".join(f"{p['precision']} ({p['latency_median_ms']:.2f} ms, {p['map50_95']:.4f})" for p in d["pareto"])


def _deploy_html(run: Run, m: Model) -> str:
    rows = [d for d in run.deploy if d["model"] == m.name]
    if not rows:
        return ""
    out = ["<h3>Engine to deploy</h3><table><thead><tr><th>device</th><th>deploy</th><th>p50 ms</th>"
           "<th>mAP50-95</th><th>Pareto front (latency, mAP50-95)</th></tr></thead><tbody>"]
    for d in rows:
        out.append(f"<tr><td>{_e(d['device'])}</td><td><b>{_e(d['deploy'] or 'none: ' + d['why'])}</b></td>"
                   f"<td>{_e(_opt(d['latency_median_ms']))}</td><td>{_e(_opt(d['map50_95'], 4))}</td>"
                   f"<td>{_e(deploy_front(d))}</td></tr>")
    out.append("</tbody></table>")
    notes_ = [n for d in rows for n in d["not_faster"]] + [g["note"] for d in rows for g in d.get("latency_given_up") or []]
    if notes_:
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes_) + "</ul>")
    return "".join(out)


def _model_html(run: Run, m: Model, figures: list[Figure], base: Path) -> str:
    sid = "model-" + m.name
    out = [f'<section id="{_e(sid)}" data-model="{_e(m.name)}">', f"<h2>{_e(m.name)}</h2>"]

    precs = _precision_order(m)
    by = {(e.device, e.precision): e for e in m.engines}
    out.append('<h3>Device × precision</h3><table class="matrix"><thead><tr><th>device</th>')
    out += [f"<th>{_e(p)}</th>" for p in precs]
    out.append("</tr></thead><tbody>")
    for dev in m.devices:
        out.append(f"<tr><th>{_e(dev)}</th>")
        for p in precs:
            e = by.get((dev, p))
            if e is None:
                out.append('<td class="absent">not configured</td>')
                continue
            out.append(f'<td class="{_status_class(e.status)}" title="{_e(e.row.get("reason") or e.status)}">'
                       f"<b>{_e(e.status)}</b><div class=\"metric\">{_e(_matrix_text(e))}</div></td>")
        out.append("</tr>")
    out.append("</tbody></table>")

    cols = columns(run, m)
    out.append('<h3>Engines</h3><div class="scroll"><table class="engines"><thead><tr>')
    out += [f"<th>{_e(h)}</th>" for _, h, _ in cols]
    out.append("</tr></thead><tbody>")
    for e in m.engines:
        out.append(f'<tr class="{_status_class(e.status)}" data-device="{_e(e.device)}" '
                   f'data-precision="{_e(e.precision)}" data-status="{_e(e.status)}">')
        for key, _, fmt in cols:
            kind = "reason" if key == "reason" else "" if key in ALWAYS else "num"
            out.append(f'<td{f" class={kind}" if kind else ""}>{_e(cell(e, key, fmt))}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    out.append(_deploy_html(run, m))

    rs = reasons(m)
    out.append("<h3>Failures and skips</h3>")
    if rs:
        out.append('<ul class="reasons">')
        out += [f'<li class="{_status_class(s)}"><b>{_e(d)}</b> {_e(", ".join(ps))}: <b>{_e(s)}</b> — {_e(r)}</li>'
                for d, s, ps, r in rs]
        out.append("</ul>")
    else:
        out.append("<p>Every engine of this model passed.</p>")
    ns = notes(m)
    if ns:
        out.append('<h3>Measurement notes</h3><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in ns)
                   + "</ul>")

    out.append("<h3>Figures</h3>")
    out += [_figure_html(f, base) for f in figures if not f.pictures]
    out += [f'<p class="gap">{_e(g)}</p>' for g in _figure_gaps(m)]
    pictures = [f for f in figures if f.pictures]
    if pictures:
        out.append('<h3>Detections</h3><div class="pictures">')
        out += [_figure_html(f, base) for f in pictures]
        out.append("</div>")

    built = [e for e in m.engines if e.record]
    if built:
        mcols = meta_columns(m)
        out.append('<h3>Build metadata</h3><div class="scroll"><table class="builds"><thead><tr>')
        out += [f"<th>{_e(h)}</th>" for h, _ in mcols] + ["<th>logs</th></tr></thead><tbody>"]
        for e in built:
            out.append(f'<tr data-device="{_e(e.device)}" data-precision="{_e(e.precision)}">')
            # One profile input a line, each unbroken.
            out += [f'<td class="nowrap">{_e(f(e)).replace("; ", "<br>")}</td>' if h in NOWRAP else f"<td>{_e(f(e))}</td>"
                    for h, f in mcols]
            out.append(f"<td>{_log_links_html(e.logs, base)}</td></tr>")
        out.append("</tbody></table></div>")
    if m.logs:
        out.append(f'<p class="logs">Logs of the ONNX stages: {_log_links_html(m.logs, base)}</p>')
    out.append("</section>")
    return "\n".join(out)


def _counts(run: Run) -> str:
    parts = [f"{run.count(s)} {s}" for s in STATUS_NOTE if run.count(s)]
    other = run.total - sum(run.count(s) for s in STATUS_NOTE)
    if other:
        parts.append(f"{other} other")
    return f"{run.total} engines: " + ", ".join(parts)


def render_html(run: Run, figures: dict[str, list[Figure]], base: Path) -> str:
    legend = "".join(f'<span class="{_status_class(s)}" title="{_e(n)}">{_e(s)}: {_e(n)}</span>'
                     for s, n in STATUS_NOTE.items())
    toc = " · ".join(f'<a href="#model-{_e(m.name)}">{_e(m.name)}</a>' for m in run.models)
    body = "\n".join(_model_html(run, m, figures.get(m.name, []), base) for m in run.models)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kiln report</title>
<style>{CSS}</style></head>
<body>
<h1>Kiln report</h1>
<p class="counts">{_e(_counts(run))}. From <a href="{_e(_rel(run.summary, base))}">{_e(run.summary.name)}</a>.</p>
<p class="legend">{legend}</p>
<p>mAP drops are against the fp32 ONNX Runtime reference of the same model (positive: the engine lost accuracy).
Latency is per batch at the batch size shown.</p>
<nav>Models: {toc}</nav>
{body}
</body></html>
"""


# --------------------------------------------------------------------------- Markdown


def _md(v) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(_md, r)) + " |" for r in rows]


def _log_links_md(logs: list[tuple[str, Path]], base: Path) -> str:
    return " ".join(f"[{rule}]({_rel(p, base)})" for rule, p in logs)


def render_markdown(run: Run, figures: dict[str, list[Figure]], base: Path) -> str:
    out = ["# Kiln report", "", f"{_counts(run)}. mAP drops are against the fp32 ONNX Runtime reference."]
    for m in run.models:
        out += ["", f"## {m.name}", "", "### Device x precision", ""]
        precs = _precision_order(m)
        by = {(e.device, e.precision): e for e in m.engines}
        rows = []
        for dev in m.devices:
            row = [dev]
            for p in precs:
                e = by.get((dev, p))
                row.append("" if e is None else " ".join(x for x in (e.status, _matrix_text(e)) if x))
            rows.append(row)
        out += _md_table(["device", *precs], rows)
        cols = columns(run, m)
        out += ["", "### Engines", ""]
        out += _md_table([h for _, h, _ in cols], [[cell(e, k, f) for k, _, f in cols] for e in m.engines])
        out += ["", "### Engine to deploy", ""]
        out += _md_table(["device", "deploy", "p50 ms", "mAP50-95", "Pareto front (latency, mAP50-95)"],
                         [[d["device"], d["deploy"] or f"none: {d['why']}", _opt(d["latency_median_ms"]),
                           _opt(d["map50_95"], 4), deploy_front(d)] for d in run.deploy if d["model"] == m.name])
        slow = [f"- {n}" for d in run.deploy if d["model"] == m.name
                for n in d["not_faster"] + [g["note"] for g in d.get("latency_given_up") or []]]
        out += ["", *slow] if slow else []
        out += ["", "### Failures and skips", ""]
        rs = reasons(m)
        out += [f"- {d} {', '.join(ps)}: **{s}**: {r}" for d, s, ps, r in rs] or ["Every engine of this model passed."]
        ns = notes(m)
        if ns:
            out += ["", "### Measurement notes", ""] + [f"- {n}" for n in ns]
        out += ["", "### Figures", ""]
        figs = figures.get(m.name, [])
        out += [f"- [{f.title}]({_rel(f.path, base)})" for f in figs if not f.pictures]
        out += [f"- {g}" for g in _figure_gaps(m)]
        if any(f.pictures for f in figs):
            out += ["", "### Detections", ""] + [f"- [{f.title}]({_rel(f.path, base)})" for f in figs if f.pictures]
        built = [e for e in m.engines if e.record]
        if built:
            mcols = meta_columns(m)
            out += ["", "### Build metadata", ""]
            out += _md_table([h for h, _ in mcols] + ["logs"],
                             [[f(e) for _, f in mcols] + [_log_links_md(e.logs, base)] for e in built])
        if m.logs:
            out += ["", f"Logs of the ONNX stages: {_log_links_md(m.logs, base)}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- entry

# Chromium's longest URL: Snakemake's self-contained report shows an HTML result as a base64 data URL.
DATA_URL_LIMIT = 2 * 1024 * 1024


def write_page(results: str | Path, out_html: str | Path, out_md: str | Path,
               summary_json: str | Path | None = None, inputs: list[str] | None = None,
               model_plots: str | Path | None = None, device_plots: str | Path | None = None) -> Run:
    """Read the run under `results`, draw its figures into the plots folders and write both pages.

    `inputs` are the rule's input files and `model_plots` / `device_plots` its output folders: under a
    storage provider these are local copies, not paths under `results` (README: Building on devices).
    """
    results = str(results)
    run = load(results, summary_json, inputs)
    figures = draw(run, model_plots or paths.fmt(paths.MODEL_PLOTS, results=results),
                   device_plots or paths.fmt(paths.DEVICE_PLOTS, results=results))
    out_html, out_md = Path(out_html), Path(out_md)
    page = render_html(run, figures, out_html.parent)
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)
    if len(page.encode()) * 4 / 3 > DATA_URL_LIMIT:
        log.warning("page: %s is %.1f MB: `snakemake --report report.html` embeds it as a data URL longer than "
                    "browsers show (2 MB), so it may stay blank there; use `--report report.zip`, or open the "
                    "file itself", out_html, len(page.encode()) / 1e6)
    with atomic_path(out_md) as tmp:
        tmp.write_text(render_markdown(run, figures, out_md.parent))
    log.info("page: %s, %d models, %d figures -> %s", _counts(run), len(run.models),
             sum(len(f) for f in figures.values()), out_html)
    return run


def run_rule(cfg, job) -> None:
    """Rule `page`: Kiln's comparison page and its figures."""
    out = job.output
    write_page(cfg.results, out.html, out.md, job.input.summary, list(job.input),
               model_plots=out.model_plots, device_plots=out.device_plots)
