"""Stage `validate`: an engine's parity against the fp32 reference, task mAP, and latency, on its device."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np

from kiln import backends
from kiln.config import KilnConfig
from kiln.inputs import load as load_inputs
from kiln.reference import run_batches
from kiln.util import read_json, write_json
from kiln.validate import accuracy, latency, parity

log = logging.getLogger(__name__)


def params(cfg: KilnConfig, device: str, model: str, precision: str) -> dict:
    v = cfg.validation
    d = cfg.devices[device]
    return {
        "thresholds": v["thresholds"][precision],
        "latency": v["latency"],
        "batch_sizes": list(d.batch_sizes),
        "batch_size": v["batch_size"],
        "match_score": v["match_score"],
        "threads": d.threads,
        "decode": cfg.models[model].decode,
    }


def gate(layout: str, thresholds: dict, result: dict) -> list[str]:
    """Every threshold the result misses, as readable reasons (empty list = pass)."""
    failures = []
    if layout == "rtdetr":
        rate = result["parity"]["detections"]["match_rate"]
        if rate < thresholds["match_rate_min"]:
            failures.append(f"detection match rate {rate:.3f} < {thresholds['match_rate_min']}")
    else:
        for name, m in result["parity"]["outputs"].items():
            if "error" in m:
                failures.append(f"output {name}: {m['error']}")
            elif m["cosine"] < thresholds["cosine_min"]:
                failures.append(f"output {name} cosine {m['cosine']:.5f} < {thresholds['cosine_min']}")
    for key, limit in (("map50_drop", "map50_drop_max"), ("map_drop", "map_drop_max")):
        drop = result["accuracy"][key]
        if drop > thresholds[limit]:
            failures.append(f"{key.replace('_', ' ')} {drop:.4f} > {thresholds[limit]}")
    return failures


def validate(
    cfg: KilnConfig,
    device: str,
    model: str,
    precision: str,
    engine_record: Path,
    reference_npz: Path,
    reference_record: Path,
    inputs_npz: Path,
    annotations: Path,
    out: Path,
    threads: int = 0,
) -> dict:
    """Validate one engine and write `out`; a failed build is carried through with its reason."""
    spec = cfg.models[model]
    d = cfg.devices[device]
    v = cfg.validation
    build = read_json(engine_record)
    result: dict = {"device": device, "model": model, "precision": precision, "host": platform.node(),
                    "build": {k: build.get(k) for k in ("status", "reason", "engine", "engine_bytes", "backend_version")}}
    if build["status"] != "built":
        result.update(status="failed", reason=f"build failed: {build.get('reason')}")
        write_json(out, result)
        return result

    backend = backends.get(d.backend)
    runner = backend.load_runner(Path(build["engine"]), d, threads=d.threads or threads)
    inputs = load_inputs(inputs_npz)
    log.info("validate %s/%s/%s: accuracy on %d images", device, model, precision, len(inputs))
    outputs = run_batches(runner.infer, spec, inputs, v["batch_size"])

    with np.load(reference_npz) as z:
        ref = {k: z[k] for k in z.files}
    ref_info = read_json(reference_record)
    par = {"outputs": {name: parity.dense(ref[name], outputs[name]) for name in ref}}
    dets = accuracy.detections(spec, outputs, inputs)
    if spec.layout == "rtdetr":
        ref_dets = accuracy.detections(spec, ref, inputs)
        par["detections"] = parity.detections(ref_dets, dets, v["match_score"])
    acc = accuracy.score(dets, inputs, annotations)
    ref_acc = ref_info["accuracy"]
    acc.update(
        reference_map50_95=ref_acc["map50_95"],
        reference_map50=ref_acc["map50"],
        map_drop=ref_acc["map50_95"] - acc["map50_95"],
        map50_drop=ref_acc["map50"] - acc["map50"],
    )
    result.update(parity=par, accuracy=acc)

    lat = []
    L = v["latency"]
    for bs in d.batch_sizes:
        feeds = inputs.feeds(spec, 0, bs) if bs <= len(inputs) else _tile(inputs.feeds(spec, 0, 1), bs)
        log.info("validate %s/%s/%s: latency at batch %d", device, model, precision, bs)
        stats = latency.measure(
            lambda feeds=feeds: runner.infer(feeds), bs, L["warmup_ms"], L["min_iterations"], L["min_seconds"], L["cv_warn_percent"]
        )
        if stats.warning:
            log.warning("batch %d: %s", bs, stats.warning)
        lat.append(stats.to_dict())
    result["latency"] = lat

    failures = gate(spec.layout, v["thresholds"][precision], result)
    result.update(status="passed" if not failures else "failed", reason="; ".join(failures) or None)
    write_json(out, result)
    log.info("validate %s/%s/%s: %s mAP50 %.4f (drop %.4f) p50 %.2f ms%s", device, model, precision,
             result["status"], acc["map50"], acc["map50_drop"], lat[0]["median_ms"],
             f" ({result['reason']})" if failures else "")
    return result


def _tile(feeds: dict, batch: int) -> dict:
    return {k: np.repeat(v, batch, axis=0) for k, v in feeds.items()}
