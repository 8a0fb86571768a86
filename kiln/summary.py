"""Stage `summary`: one row per model x device x precision, as JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from kiln import findings, integrity, paths
from kiln.findings import MISSING, NOT_MEASURABLE, STALE, describe_check, latency_notes
from kiln.specs import KilnConfig, base_precision
from kiln.util import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

COLUMNS = [
    "model", "device", "precision", "backend", "status", "reason", "simplify", "onnx_bytes", "engine_bytes",
    "parity_min_cosine", "parity_max_abs", "parity_weakest", "detection_match_rate", "detection_box_iou",
    "map50_95", "map50", "map_drop", "map50_drop",
    "batch_size", "latency_mean_ms", "latency_median_ms", "latency_p99_ms", "latency_cv_percent", "throughput_ips",
    "gpu_compute_median_ms", "pipeline_median_ms", "pytorch_latency_median_ms", "speedup_vs_pytorch",
    "best_streams", "streams_images_per_s", "streams_p99_ms", "images_per_s_by_streams",
    "diagnosis", "flags", "hint", "kept", "latency_given_up",
]


def damage(
    cfg: KilnConfig, device: str, model: str, precision: str, validated: bool = True, local=str, planning: bool = False
) -> str | None:
    """What no longer matches its record among the files a row stands on, with the fix; None if all match.

    The engine against engine.json, the ONNX it was built from against the sha256 there, and (for a
    `validated` row) the reference outputs against reference.json; files that are not at hand (in
    storage only) are not compared. Snakemake remakes none of these by itself: to it, a changed output of
    a finished job is finished (README: Interrupted, failed and changed files). `planning`: as the workflow sees it
    before a run, leaving to Snakemake what it will remake anyway (an ONNX newer than the engine, a
    reference record of an older Kiln).
    """
    d = cfg.devices[device]
    key = {"results": cfg.results, "device": device, "model": model, "precision": precision}
    target = paths.fmt(paths.ENGINE_RECORD, **key)
    record_path = Path(local(target))
    if not record_path.is_file():
        return None
    record = _record(record_path)
    if record is None:
        return (f"{record_path} cannot be read as JSON (it is damaged or empty): run Snakemake again with "
                f"--forcerun {target} to rebuild it")
    engine = Path(local(paths.fmt(paths.ENGINE_FILE, **key)))
    why = integrity.engine_problem(record, record_path, engine, target=target) if engine.is_file() else None
    src = d.variant_of(precision)
    onnx = Path(local(paths.fmt(paths.VARIANT, results=cfg.results, model=model, opset=d.opset, precision=src)))
    if why is None and onnx.is_file() and not (planning and onnx.stat().st_mtime > record_path.stat().st_mtime):
        why = integrity.onnx_problem(record, record_path, onnx, target=target)
    if why is not None or not validated or record.get("status") != "built":
        return why
    ref_target = paths.fmt(paths.REFERENCE_RECORD, results=cfg.results, model=model, opset=d.opset)
    ref_record = Path(local(ref_target))
    outputs = Path(local(paths.fmt(paths.REFERENCE, results=cfg.results, model=model, opset=d.opset)))
    if ref_record.is_file() and outputs.is_file():
        ref = _record(ref_record)
        if ref is None:
            return (f"{ref_record} cannot be read as JSON (it is damaged or empty): run Snakemake again with "
                    f"--forcerun {ref_target} to make the reference again")
        if not (planning and "outputs_sha256" not in ref):
            return integrity.reference_problem(ref, ref_record, outputs, target=ref_target)
    return None


def _record(path: Path) -> dict | None:
    """A record's JSON, or None when it cannot be read (truncated, emptied, not JSON)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def damaged(cfg: KilnConfig, can_run: dict[str, str | None], can_build: dict[str, str | None]) -> dict[str, str]:
    """Rows whose files no longer match their records, as the workflow sees them before a run: "device/model/
    precision" -> why. The summary rule's params, so that Snakemake reruns the summary when a file changes
    while keeping its mtime (the summary then shows the row as stale)."""
    return {f"{dev}/{m}/{p}": why for dev, m, p in cfg.jobs() if can_build.get(dev) is None
            and (why := damage(cfg, dev, m, p, validated=can_run.get(dev) is None, planning=True))}


def _stale_validation(cfg: KilnConfig, v: dict, v_path: Path, device: str, model: str, precision: str, local) -> str | None:
    """Why a validation is not of the engine and reference whose records are at hand; None when it is."""
    key = {"results": cfg.results, "device": device, "model": model, "precision": precision}
    record_path = Path(local(paths.fmt(paths.ENGINE_RECORD, **key)))
    record = read_json(record_path) if record_path.is_file() else None
    if not record or record.get("status") != "built":
        return None
    fix = f"Run Snakemake again with --forcerun {paths.fmt(paths.VALIDATION, **key)} to validate it again"
    done = v.get("validated")
    if not done:
        return f"{v_path} does not record which engine it validated (an older Kiln wrote it). {fix}"
    if done.get("engine_sha256") != record.get("engine_sha256"):
        return (f"{v_path} validated another engine (sha256 {str(done.get('engine_sha256'))[:12]}...) than "
                f"{record_path} records ({str(record.get('engine_sha256'))[:12]}...). {fix}")
    opset = cfg.devices[device].opset
    ref_path = Path(local(paths.fmt(paths.REFERENCE_RECORD, results=cfg.results, model=model, opset=opset)))
    ref = read_json(ref_path) if ref_path.is_file() else {}
    if ref.get("outputs_sha256") and done.get("reference_sha256") != ref["outputs_sha256"]:
        return (f"{v_path} compared the engine with other reference outputs than {ref_path} records. {fix}")
    return None


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
    src = d.variant_of(precision)
    onnx = Path(local(paths.fmt(paths.VARIANT, results=R, model=model, opset=d.opset, precision=src)))
    variant = Path(local(paths.fmt(paths.VARIANT_RECORD, results=R, model=model, opset=d.opset, precision=src)))
    if onnx.is_file():
        row["onnx_bytes"] = onnx.stat().st_size
    elif variant.is_file():  # the variant itself stays in storage; its record has the size
        row["onnx_bytes"] = read_json(variant).get("size_bytes")
    # A mixed variant: what it keeps, and why (its own record, also where the engine is built from the strict source).
    mixed = Path(local(paths.fmt(paths.VARIANT_RECORD, results=R, model=model, opset=d.opset, precision=precision)))
    if mixed.is_file() and precision != base_precision(precision):
        fb = read_json(mixed).get("fallback") or {}
        row["kept"] = (f"{len(fb.get('kept', []))} kept in higher precision: "
                       + (", ".join(k["node"] for k in fb.get("kept", [])) or "none") + f" ({fb.get('why')})")
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
    # Never a number measured on other files than those now at hand: the row says why instead (README).
    why = damage(cfg, device, model, precision, validated=not no_run, local=local)
    if why:
        row.update(status=STALE, reason=why)
        return row
    if no_run:
        # Built ahead of time here; validation needs the device itself.
        e = read_json(local(paths.fmt(paths.ENGINE_RECORD, results=R, device=device, model=model, precision=precision)))
        if e["status"] == "built":
            row.update(status="built", reason=f"not validated on this host: {no_run}", engine_bytes=e["engine_bytes"])
        else:
            row.update(status="failed", reason=f"build failed: {e.get('reason')}")
        return row
    v_path = Path(local(paths.fmt(paths.VALIDATION, results=R, device=device, model=model, precision=precision)))
    if not v_path.is_file():
        row.update(status=MISSING, reason=f"{v_path} does not exist: run the workflow again to validate this engine")
        return row
    v = read_json(v_path)
    why = _stale_validation(cfg, v, v_path, device, model, precision, local)
    if why:
        row.update(status=STALE, reason=why)
        return row
    row.update(status=v["status"], reason=v.get("reason"), engine_bytes=v["build"].get("engine_bytes"))
    if row["status"] == "failed":
        e_path = Path(local(paths.fmt(paths.ENGINE_RECORD, results=R, device=device, model=model, precision=precision)))
        row["hint"] = findings.tf32_hint(row, read_json(e_path) if e_path.is_file() else None)
    flags = [f"latency unstable at {n}" for n in latency_notes(v)] + list(v.get("findings") or [])
    if flags:
        row["flags"] = "; ".join(flags)
    if "parity" in v:
        outs = [m for m in v["parity"]["outputs"].values() if "cosine" in m]
        row["parity_min_cosine"] = min(m["cosine"] for m in outs) if outs else None
        row["parity_max_abs"] = max(m["max_abs"] for m in outs) if outs else None
        # The part of the outputs nearest its threshold (kiln.validate.parity.weakest): "scores 0.9699".
        row["parity_weakest"] = describe_check(v["parity"].get("weakest"))
        if "detections" in v["parity"]:
            row["detection_match_rate"] = v["parity"]["detections"]["match_rate"]
            row["detection_box_iou"] = v["parity"]["detections"].get("mean_box_iou")
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
        row.update(_streams(v.get("streams")))
    return row


def _streams(rec: dict | None) -> dict:
    """Concurrent streams (validation.json "streams"): the count to deploy with, its images/s and p99,
    and images/s at each count timed ({"1": ..., "2": ...})."""
    best = (rec or {}).get("best")
    at = next((r for r in rec["results"] if r["streams"] == best), None) if best else None
    if at is None:
        return {}
    return {"best_streams": best, "streams_images_per_s": at["images_per_s"], "streams_p99_ms": at["p99_ms"],
            "images_per_s_by_streams": dict(rec["images_per_s"])}


def rows(cfg: KilnConfig, cannot_build: dict[str, str], cannot_run: dict[str, str], local=str) -> list[dict]:
    """One row per job; the dicts map devices this host cannot build or run to the reason."""
    table = [_row(cfg, dev, m, p, cannot_build.get(dev), cannot_run.get(dev), local) for dev, m, p in cfg.jobs()]
    slow = findings.not_faster(table)
    given_up = findings.latency_given_up(table, latency_limits(cfg))
    for r in table:
        key = (r["model"], r["device"], r["precision"])
        note = slow.get(key)
        if note:
            r["flags"] = "; ".join(f for f in (r["flags"], note) if f)
        if key in given_up:  # a mixed row: the latency it gave up against its strict row on this device
            r["latency_given_up"] = given_up[key]["loss"]
            if given_up[key]["over"]:
                r["flags"] = "; ".join(f for f in (r["flags"], given_up[key]["note"]) if f)
        r["hint"] = r["hint"] or findings.sensitivity_hint(r, cfg.devices[r["device"]].precisions)
    return table


def latency_limits(cfg: KilnConfig) -> dict[str, float | None]:
    """Model -> its mixed variants' `sensitivity.max_latency_loss` (None: no limit)."""
    return {name: spec.sensitivity.get("max_latency_loss") for name, spec in cfg.models.items()}


def deploy_markdown(plan: list[dict]) -> str:
    """The engine to deploy per model x device, its Pareto front, and lower precisions that are not faster."""
    lines = ["## Engine to deploy", "", "| model | device | deploy | p50 ms | mAP50-95 | Pareto front (latency, mAP50-95) |",
             "|---|---|---|---|---|---|"]
    for d in plan:
        front = ", ".join(f"{p['precision']} ({p['latency_median_ms']:.2f} ms, {p['map50_95']:.4f}, {p['status']})"
                          for p in d["pareto"])
        lines.append(f"| {d['model']} | {d['device']} | {d['deploy'] or 'none: ' + d['why']} | "
                     f"{_fmt(d['latency_median_ms'])} | {_fmt(d['map50_95'])} | {front} |")
    slow = [n for d in plan for n in d["not_faster"]]
    if slow:
        lines += ["", "Not faster than the precision above it:", ""] + [f"- {n}" for n in slow]
    given_up = [g["note"] for d in plan for g in d.get("latency_given_up") or []]
    if given_up:
        lines += ["", "Latency the mixed variants gave up against their strict ones:", ""] + [f"- {n}" for n in given_up]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # images/s by stream count: "1: 120.3, 2: 210.5"
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def to_markdown(table: list[dict], limits: dict[str, float | None] | None = None) -> str:
    cols = ["model", "device", "precision", "status", "flags", "map50_95", "map50", "map50_drop", "parity_weakest",
            "parity_min_cosine", "detection_match_rate", "latency_median_ms", "latency_p99_ms", "throughput_ips",
            "pipeline_median_ms", "speedup_vs_pytorch", "best_streams", "streams_images_per_s",
            "images_per_s_by_streams", "engine_bytes", "reason", "kept", "latency_given_up"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
    passed = sum(r["status"] == "passed" for r in table)
    lines += ["", f"{passed} of {len(table)} rows passed."]
    unstable = sum(r["status"] == "passed" and "latency unstable" in (r["flags"] or "") for r in table)
    if unstable:
        lines.append(f"{unstable} of them with unstable latency (flags).")
    unmeasured = sum(r["status"] == NOT_MEASURABLE for r in table)
    if unmeasured:
        lines.append(f"{unmeasured} rows are {NOT_MEASURABLE}: their reference shows nothing to compare with (reason).")
    stale = [r for r in table if r["status"] in (STALE, MISSING)]
    if stale:
        lines.append(f"{len(stale)} rows are {STALE} or {MISSING}: their validation is not of the files now there "
                     f"(reason: what changed, and the fix).")
    hints = [r["hint"] for r in table if r.get("hint")]
    if hints:
        lines += ["", *(f"- {r['model']} {r['device']} {r['precision']}: {r['hint']}" for r in table if r.get("hint"))]
    return "# Kiln summary\n\n" + "\n".join(lines) + "\n\n" + deploy_markdown(findings.deploy(table, limits))


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
    limits = latency_limits(cfg)
    write_json(out_json, {"rows": table, "columns": COLUMNS, "deploy": findings.deploy(table, limits)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _fmt(v) if isinstance(v, float | dict) else v for k, v in r.items()} for r in table)
    with atomic_path(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table, limits))
    log.info("summary: %d rows -> %s", len(table), os.path.dirname(out_json))
    return table


def run_rule(cfg, job) -> None:
    """Rule `summary`: the run's table as JSON, CSV and Markdown."""
    o = job.output
    write_summary(cfg, o.json, o.csv, o.md, job.params.cannot_build, job.params.cannot_run, inputs=list(job.input))
