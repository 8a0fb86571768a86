"""Stage `summary`: one row per model x device x precision, as JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from kiln import backends, paths
from kiln.config import KilnConfig
from kiln.util import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

COLUMNS = [
    "model", "device", "precision", "backend", "status", "reason", "simplify", "onnx_bytes", "engine_bytes",
    "parity_min_cosine", "parity_max_abs", "detection_match_rate", "map50_95", "map50", "map_drop", "map50_drop",
    "batch_size", "latency_mean_ms", "latency_median_ms", "latency_p99_ms", "latency_cv_percent", "throughput_ips",
    "gpu_compute_median_ms", "pipeline_median_ms", "pytorch_latency_median_ms", "speedup_vs_pytorch",
    "diagnosis",
]


def _row(
    cfg: KilnConfig, device: str, model: str, precision: str, no_build: str | None, no_run: str | None,
    local=str,
) -> dict:
    """`local` maps an artifact path to the file the job was given for it (paths.local_copies)."""
    d = cfg.devices[device]
    R = cfg.results
    row = dict.fromkeys(COLUMNS)
    row.update(model=model, device=device, precision=precision, backend=d.backend)
    simp = Path(local(paths.fmt(paths.SIMPLIFY_RECORD, results=R, model=model, opset=d.opset)))
    if simp.is_file():
        s = read_json(simp)
        row["simplify"] = s["status"] + (f" ({s['reason']})" if s.get("reason") else "")
    src = backends.get(d.backend).source_precision(precision, d)
    onnx = Path(local(paths.fmt(paths.VARIANT, results=R, model=model, opset=d.opset, precision=src)))
    variant = Path(local(paths.fmt(paths.VARIANT_RECORD, results=R, model=model, opset=d.opset, precision=src)))
    if onnx.is_file():
        row["onnx_bytes"] = onnx.stat().st_size
    elif variant.is_file():  # the variant itself stays in storage; its record has the size
        row["onnx_bytes"] = read_json(variant).get("size_bytes")
    if no_build:
        row.update(status="not run", reason=f"not run on this host: {no_build}")
        return row
    diag = Path(local(paths.fmt(paths.DIAGNOSIS, results=R, device=device, model=model, precision=precision)))
    if diag.is_file():  # a failed build's smallest failing subgraph and the fix (kiln/diagnose.py)
        g = read_json(diag)
        if g.get("status") == "diagnosed":
            nodes = ", ".join(f"{n['op']} {n['name']}" for n in g.get("failing_nodes", [])[:5])
            row["diagnosis"] = f"{g['hint']} [failing subgraph: {nodes}; {g['reduced_onnx']}]"
        elif g.get("status") in ("failed", "not reproduced"):
            row["diagnosis"] = f"not diagnosed: {g.get('reason')}"
    if no_run:
        # Built ahead of time here; validation needs the device itself.
        e = read_json(local(paths.fmt(paths.ENGINE_RECORD, results=R, device=device, model=model, precision=precision)))
        if e["status"] == "built":
            row.update(status="built", reason=f"not validated on this host: {no_run}", engine_bytes=e["engine_bytes"])
        else:
            row.update(status="failed", reason=f"build failed: {e.get('reason')}")
        return row
    v = read_json(local(paths.fmt(paths.VALIDATION, results=R, device=device, model=model, precision=precision)))
    row.update(status=v["status"], reason=v.get("reason"), engine_bytes=v["build"].get("engine_bytes"))
    if "parity" in v:
        outs = [m for m in v["parity"]["outputs"].values() if "cosine" in m]
        row["parity_min_cosine"] = min(m["cosine"] for m in outs) if outs else None
        row["parity_max_abs"] = max(m["max_abs"] for m in outs) if outs else None
        if "detections" in v["parity"]:
            row["detection_match_rate"] = v["parity"]["detections"]["match_rate"]
        a = v["accuracy"]
        row.update(map50_95=a["map50_95"], map50=a["map50"], map_drop=a["map_drop"], map50_drop=a["map50_drop"])
        lat = v["latency"][0]
        row.update(
            batch_size=lat["batch_size"], latency_mean_ms=lat["mean_ms"], latency_median_ms=lat["median_ms"],
            latency_p99_ms=lat["p99_ms"], latency_cv_percent=lat["cv_percent"], throughput_ips=lat["throughput_ips"],
        )
        # GPU engines: GPU compute time from CUDA events (trtexec's "GPU Compute Time").
        compute = (lat.get("phases") or {}).get("compute")
        row["gpu_compute_median_ms"] = compute["median_ms"] if compute else None
        # End-to-end detection latency (preprocess + engine + decode/NMS) at the same batch size.
        pipe = next((p for p in v.get("pipeline") or [] if p["batch_size"] == lat["batch_size"]), None)
        row["pipeline_median_ms"] = pipe["median_ms"] if pipe else None
        # PyTorch eager on the same device, same inputs and timer: its median over the engine's at batch 1.
        row["pytorch_latency_median_ms"] = (v.get("baseline") or {}).get("median_ms_batch1")
        row["speedup_vs_pytorch"] = v.get("speedup_vs_pytorch")
    return row


def rows(cfg: KilnConfig, cannot_build: dict[str, str], cannot_run: dict[str, str], local=str) -> list[dict]:
    """One row per job; the dicts map devices this host cannot build or run to the reason."""
    return [_row(cfg, dev, m, p, cannot_build.get(dev), cannot_run.get(dev), local) for dev, m, p in cfg.jobs()]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def to_markdown(table: list[dict]) -> str:
    cols = ["model", "device", "precision", "status", "map50_95", "map50", "map50_drop", "parity_min_cosine",
            "detection_match_rate", "latency_median_ms", "latency_p99_ms", "throughput_ips", "pipeline_median_ms",
            "speedup_vs_pytorch", "engine_bytes", "reason"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
    passed = sum(r["status"] == "passed" for r in table)
    lines += ["", f"{passed} of {len(table)} rows passed."]
    return "# Kiln summary\n\n" + "\n".join(lines) + "\n"


def write_summary(
    cfg: KilnConfig,
    out_json: Path,
    out_csv: Path,
    out_md: Path,
    cannot_build: dict[str, str] | None = None,
    cannot_run: dict[str, str] | None = None,
    inputs: list[str] | None = None,
) -> list[dict]:
    """Write the three summary files; `inputs` are the rule's input files (local copies under storage)."""
    table = rows(cfg, cannot_build or {}, cannot_run or {}, paths.local_copies(inputs or []))
    write_json(out_json, {"rows": table, "columns": COLUMNS})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _fmt(v) if isinstance(v, float) else v for k, v in r.items()} for r in table)
    with atomic_path(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table))
    log.info("summary: %d rows -> %s", len(table), os.path.dirname(out_json))
    return table
