"""The page's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) as PNG bytes.

Each function returns None when the run holds nothing to draw (no engine validated, no build), and
the page says why instead of showing an empty axis.
"""

from __future__ import annotations

import io

from kiln.report.data import Engine, Model

# One colour per precision, the same in every figure.
COLOURS = {"fp32": "#1f77b4", "fp16": "#ff7f0e", "fp16-mixed": "#ffbb78", "bf16": "#9467bd", "int8": "#2ca02c", "int8-mixed": "#98df8a",
           "fp8": "#d62728", "fp8-mixed": "#ff9896", "best": "#8c564b"}
MARKERS = "osD^vP*Xh"
DPI = 100


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same run draws the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _colour(precision: str) -> str:
    return COLOURS.get(precision, "#7f7f7f")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both: lower-or-equal x (latency) and higher y (accuracy).

    Returned in increasing x. Of points with the same x only the one with the highest y can be on it.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_latency(model: Model) -> bytes | None:
    """mAP50-95 against p50 latency of every validated engine of a model; the Pareto front of those that passed.

    Failed engines are drawn (crossed out) but cannot be on the front: they are not a choice to deploy.
    """
    pts = [(e, e.row["latency_median_ms"], e.row["map50_95"]) for e in model.engines
           if e.row.get("latency_median_ms") is not None and e.row.get("map50_95") is not None]
    if not pts:
        return None
    fig, ax = _figure(6.4, 4.2)
    devices = list(dict.fromkeys(e.device for e, _, _ in pts))
    for e, x, y in pts:
        ax.scatter(x, y, color=_colour(e.precision), marker=MARKERS[devices.index(e.device) % len(MARKERS)],
                   s=60, zorder=3, edgecolors="black", linewidths=0.5)
        failed = e.status != "passed"
        if failed:
            ax.scatter(x, y, marker="x", color="#b00020", s=110, zorder=5, linewidths=1.5)
        ax.annotate(f"{e.device}/{e.precision}" + (f" ({e.status})" if failed else ""), (x, y),
                    textcoords="offset points", xytext=(6, 4), fontsize=8, color="#b00020" if failed else "black")
    passed = [(x, y) for e, x, y in pts if e.status == "passed"]
    front = [passed[i] for i in pareto_front(passed)]
    if front:
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        ax.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, zorder=2,
                label="Pareto front (passed)")
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    for dev in devices:
        ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[devices.index(dev) % len(MARKERS)],
                   label=f"device {dev}")
    for prec in dict.fromkeys(e.precision for e, _, _ in pts):
        ax.scatter([], [], color=_colour(prec), marker="s", label=prec)
    if len(passed) < len(pts):
        ax.scatter([], [], marker="x", color="#b00020", label="failed")
    ax.margins(0.15)  # room for the labels of the outermost points
    batch = sorted({e.row.get("batch_size") for e, _, _ in pts} - {None})
    ax.set_xlabel(f"latency p50 (ms, batch {'/'.join(map(str, batch))})")
    ax.set_ylabel("mAP50-95")
    ax.set_title(f"{model.name}: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def latency_distribution(model: Model, device: str) -> bytes | None:
    """Per engine and batch size: min-max whisker, p50-p99 box, p90 tick, mean diamond (no raw samples are kept)."""
    items = [(e, lat) for e in model.engines if e.device == device for lat in e.latency]
    if not items:
        return None
    fig, ax = _figure(6.4, 1.2 + 0.45 * len(items))
    labels = []
    for y, (e, lat) in enumerate(items):
        c = _colour(e.precision)
        ax.plot([lat["min_ms"], lat["max_ms"]], [y, y], color=c, linewidth=1)
        ax.plot([lat["min_ms"]] * 2 + [lat["max_ms"]] * 2, [y - 0.15, y + 0.15, y - 0.15, y + 0.15],
                linestyle="none", marker="|", color=c, markersize=10)
        ax.barh(y, lat["p99_ms"] - lat["median_ms"], left=lat["median_ms"], height=0.5, color=c, alpha=0.35,
                edgecolor=c)
        ax.plot([lat["median_ms"]] * 2, [y - 0.25, y + 0.25], color="black", linewidth=2)
        ax.plot([lat["p90_ms"]] * 2, [y - 0.25, y + 0.25], color=c, linewidth=1, linestyle=":")
        ax.plot(lat["mean_ms"], y, marker="D", color="black", markersize=4, linestyle="none")
        labels.append(f"{e.precision} b{lat['batch_size']}")
    ax.set_yticks(range(len(items)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("latency per batch (ms)\nwhiskers min and max, box p50 to p99, dotted p90, diamond mean")
    ax.set_title(f"{model.name} on {device}: latency distribution")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def throughput_batch(model: Model, device: str) -> bytes | None:
    """Images per second against batch size, one line per precision."""
    engines = [e for e in model.engines if e.device == device and e.latency]
    if not engines:
        return None
    fig, ax = _figure(6.4, 3.6)
    sizes: set[int] = set()
    for e in engines:
        xs = [lat["batch_size"] for lat in e.latency]
        sizes |= set(xs)
        ax.plot(xs, [lat["throughput_ips"] for lat in e.latency], marker="o", color=_colour(e.precision),
                label=e.precision)
    return _throughput_axes(fig, ax, sizes, "batch size", "throughput (images/s)",
                            f"{model.name} on {device}: throughput vs batch size")


def throughput_streams(model: Model, device: str) -> bytes | None:
    """Images per second against concurrent streams, one line per precision, its best count circled."""
    engines = [e for e in model.engines if e.device == device and e.streams]
    if not engines:
        return None
    fig, ax = _figure(6.4, 3.6)
    counts: set[int] = set()
    for e in engines:
        res = e.streams["results"]
        xs = [r["streams"] for r in res]
        counts |= set(xs)
        ax.plot(xs, [r["images_per_s"] for r in res], marker="o", color=_colour(e.precision),
                label=f"{e.precision} (batch {e.streams['batch_size']}, best {e.streams['best']})")
        at = next((r for r in res if r["streams"] == e.streams.get("best")), None)
        if at:
            ax.scatter(at["streams"], at["images_per_s"], s=180, facecolors="none", edgecolors="black", zorder=4)
    return _throughput_axes(fig, ax, counts, "concurrent streams", "throughput (images/s, all streams)",
                            f"{model.name} on {device}: throughput vs streams")


def _throughput_axes(fig, ax, xs: set[int], xlabel: str, ylabel: str, title: str) -> bytes:
    """A throughput figure's axes: x on a log2 scale ticked at the measured values, y from 0."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def build_time(model: Model) -> bytes | None:
    """Engine build seconds per device (engine.json), one bar per precision; failed builds hatched."""
    built: list[Engine] = [e for e in model.engines if e.record and e.record.get("build_seconds") is not None]
    if not built:
        return None
    devices = list(dict.fromkeys(e.device for e in built))
    precisions = list(dict.fromkeys(e.precision for e in built))
    width = 0.8 / len(precisions)
    fig, ax = _figure(6.4, 3.6)
    for j, prec in enumerate(precisions):
        label = prec  # once per precision in the legend
        for i, dev in enumerate(devices):
            e = next((e for e in built if e.device == dev and e.precision == prec), None)
            if e is None:
                continue
            failed = e.record.get("status") != "built"
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, e.record["build_seconds"], width=width * 0.9, color=_colour(prec),
                   hatch="//" if failed else None, edgecolor="#b00020" if failed else "none",
                   label=label)
            label = None
            if failed:
                ax.annotate("failed", (x, e.record["build_seconds"]), ha="center", va="bottom", fontsize=7,
                            color="#b00020")
    ax.set_xticks(range(len(devices)), devices)
    ax.set_ylabel("build time (s)")
    ax.set_title(f"{model.name}: engine build time per device")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def picture_names(model: Model, device: str) -> list[str]:
    """File names of the detection pictures any engine of the model has on the device, in recorded order."""
    return list(dict.fromkeys(p.name for e in model.engines if e.device == device for p in e.pictures))


def detections_side_by_side(model: Model, device: str, name: str, height: int = 320) -> bytes | None:
    """One validation image's detection picture from each precision of a device, side by side, labelled (JPEG)."""
    from PIL import Image, ImageDraw, ImageFont

    tiles = []
    for e in model.engines:
        pic = next((p for p in e.pictures if p.name == name), None) if e.device == device else None
        if pic:
            with Image.open(pic) as im:
                im = im.convert("RGB")
                h = min(height, im.height)
                tiles.append((e, im.resize((max(1, round(im.width * h / im.height)), h))))
    if not tiles:
        return None
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    strip, gap = 26, 8
    h = max(im.height for _, im in tiles)
    out = Image.new("RGB", (sum(im.width for _, im in tiles) + gap * (len(tiles) - 1), h + strip), "white")
    canvas, x = ImageDraw.Draw(out), 0
    for e, im in tiles:
        out.paste(im, (x, strip))
        canvas.text((x + 4, 4), f"{e.precision} ({e.status})", fill="#b00020" if e.status == "failed" else "black",
                    font=font)
        x += im.width + gap
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=85)  # photos: a fraction of a PNG's size, and the page embeds them
    return buf.getvalue()


MODEL_PLOTS = {"accuracy_latency": accuracy_latency, "build_time": build_time}
DEVICE_PLOTS = {"latency": latency_distribution, "throughput": throughput_batch, "streams": throughput_streams}
