"""Stage `validate`: an engine's parity against the fp32 reference, task mAP, and latency, on its device.

Latency follows trtexec's method (kiln.latency). CPU backends are timed with the host
clock around a synchronous run. GPU engines (TensorRT, TensorRT-RTX) are timed with CUDA events
on the runner's stream: H2D copies, GPU compute, D2H copies and host enqueue time per query, two
queries in flight, spin-wait, CUDA graphs where the engine can be captured, at every batch size
the engine's profile admits (powers of two up to its largest, plus the configured ones); where
trtexec (or tensorrt_rtx) is on PATH it times the same engine with the same settings pinned, and
both are recorded. Every device also gets the end-to-end detection latency (preprocessing +
engine + decode/NMS, host-timed, kiln.validate.pipeline), a few pictures of its detections, and
its speedup over the PyTorch eager baseline (kiln.baseline) at batch 1, and its throughput at N
concurrent streams (validation.streams, kiln.validate.streams): images/s, per-stream p50/p99 and the
stream count to deploy with.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np

from kiln import accuracy, backends, integrity, latency, parity, paths
from kiln.batches import load as load_inputs
from kiln.batches import run_batches
from kiln.findings import NOT_MEASURABLE
from kiln.parity import gate
from kiln.specs import KilnConfig, base_precision
from kiln.util import read_json, write_json
from kiln.validate import pictures, pipeline, streams

log = logging.getLogger(__name__)

# How GPU engines are timed (trtexec's vocabulary); trtexec runs with the same values.
GPU_TIMING = {"spin_wait": True, "data_transfers": True, "cuda_graph": True, "depth": 2}
PICTURES = {"count": pictures.DEFAULT_COUNT}


def params(cfg: KilnConfig, device: str, model: str, precision: str) -> dict:
    v = cfg.validation
    d = cfg.devices[device]
    return {
        "thresholds": v["thresholds"][base_precision(precision)],
        "latency": v["latency"],
        "batch_sizes": list(d.batch_sizes),
        "batch_size": v["batch_size"],
        "match_score": v["match_score"],
        "min_reference_map": v["min_reference_map"],
        "threads": d.threads,
        "decode": cfg.models[model].decode,
        "streams": v["streams"],
        "max_streams": d.max_streams,
        "gpu_timing": GPU_TIMING,
        "pictures": PICTURES,
    }


def compare(spec, ref: dict, outputs: dict, inputs, match_score: float) -> tuple[dict, list[dict]]:
    """The engine's outputs against the reference's: whole outputs, their semantic parts, and detections
    (both decoded and NMSed with the same code, kiln.accuracy, for every layout); and the engine's detections."""
    par = {"outputs": {name: parity.dense(ref[name], outputs[name]) for name in ref},
           "parts": parity.parts(spec.layout, spec.nms, ref, outputs, match_score)}
    dets = accuracy.detections(spec, outputs, inputs)
    par["detections"] = parity.detections(accuracy.detections(spec, ref, inputs), dets, match_score)
    return par, dets


def measurable(reference_detections: int, images: int, conf: float, reference_map: float, floor: float) -> str | None:
    """Why a validation can measure nothing (None when it can): no reference detections, or a reference mAP
    below `validation.min_reference_map`. Parity and mAP drops against such a reference prove nothing."""
    if reference_detections == 0:
        return f"the reference makes no detections above conf {conf} on {images} images"
    if reference_map < floor:
        return (f"reference mAP50-95 {reference_map:.4f} is below validation.min_reference_map {floor}: "
                f"with random weights nothing can be compared")
    return None


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
    baseline: Path | None = None,
    engine_file: Path | None = None,
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

    # The rule's engine input (a local copy under a storage provider); else the record's path.
    engine = Path(engine_file or build["engine"])
    # Both checked in full before use: a changed file is one clear error, not a parser's traceback.
    key = {"results": cfg.results, "device": device, "model": model, "precision": precision}
    integrity.check(integrity.engine_problem(build, engine_record, engine, full=True,
                                             target=paths.fmt(paths.ENGINE_RECORD, **key)))
    ref_info = read_json(reference_record)
    integrity.check(integrity.reference_problem(
        ref_info, reference_record, reference_npz, full=True,
        target=paths.fmt(paths.REFERENCE_RECORD, results=cfg.results, model=model, opset=d.opset)))
    # What the summary compares with the records it finds (kiln/summary.py): a validation of other files is stale.
    result["validated"] = {"engine_sha256": build.get("engine_sha256"), "reference_sha256": ref_info["outputs_sha256"]}

    backend = backends.get(d.backend)
    result["findings"] = backend.findings(d, build)
    runner = backend.load_runner(engine, d, threads=d.threads or threads)
    inputs = load_inputs(inputs_npz)
    log.info("validate %s/%s/%s: accuracy on %d images", device, model, precision, len(inputs))
    outputs = run_batches(runner.infer, spec, inputs, v["batch_size"])

    with np.load(reference_npz) as z:
        ref = {k: z[k] for k in z.files}
    par, dets = compare(spec, ref, outputs, inputs, v["match_score"])
    acc = accuracy.score(dets, inputs, annotations)
    ref_acc = ref_info["accuracy"]
    acc.update(
        reference_map50_95=ref_acc["map50_95"],
        reference_map50=ref_acc["map50"],
        map_drop=ref_acc["map50_95"] - acc["map50_95"],
        map50_drop=ref_acc["map50"] - acc["map50"],
    )
    result.update(parity=par, accuracy=acc)

    result["pictures"] = pictures.write(Path(out).parent, annotations, inputs.image_ids, dets,
                                        count=PICTURES["count"], min_score=v["match_score"])

    L = v["latency"]
    if runner.device_timed:
        result.update(_gpu_latency(backend, runner, spec, d, inputs, L))
    else:
        result["latency"] = _host_latency(runner, spec, d, inputs, L)
    lat = result["latency"]
    log.info("validate %s/%s/%s: throughput at %s concurrent streams", device, model, precision,
             "/".join(map(str, v["streams"])))
    result["streams"] = streams.measure(runner, spec, d, lambda bs: _feeds(spec, inputs, bs), v["streams"], L,
                                        GPU_TIMING)
    log.info("validate %s/%s/%s: end-to-end pipeline latency", device, model, precision)
    result["pipeline"] = pipeline.measure(spec, runner.infer, pipeline.load_images(annotations, max(d.batch_sizes)),
                                          d.batch_sizes, L)
    runner.close()
    result.update(_speedup(baseline, lat))

    thresholds = v["thresholds"][base_precision(precision)]
    par["weakest"] = parity.weakest(parity.checks(par, thresholds))
    failures = gate(spec.layout, thresholds, result)
    # Counted at the score the matching requires (validation.match_score): below it nothing is matched.
    unmeasurable = measurable(par["detections"]["reference_detections"], len(inputs), v["match_score"],
                              ref_acc["map50_95"], v["min_reference_map"])
    if unmeasurable:  # neither passed nor failed: the gates compare against a reference that shows nothing
        reason = unmeasurable + (f" (gates: {'; '.join(failures)})" if failures else "")
        result.update(status=NOT_MEASURABLE, reason=reason)
    else:
        result.update(status="passed" if not failures else "failed", reason="; ".join(failures) or None)
    write_json(out, result)
    log.info("validate %s/%s/%s: %s mAP50 %.4f (drop %.4f) p50 %.2f ms%s", device, model, precision,
             result["status"], acc["map50"], acc["map50_drop"], lat[0]["median_ms"],
             f" ({result['reason']})" if result["reason"] else "")
    return result


def _tile(feeds: dict, batch: int) -> dict:
    return {k: np.repeat(v, batch, axis=0) for k, v in feeds.items()}


def _feeds(spec, inputs, batch: int) -> dict:
    return inputs.feeds(spec, 0, batch) if batch <= len(inputs) else _tile(inputs.feeds(spec, 0, 1), batch)


def _host_latency(runner, spec, d, inputs, L: dict) -> list[dict]:
    """Host-timed latency of a synchronous runner at each of the device's batch sizes."""
    out = []
    for bs in d.batch_sizes:
        feeds = _feeds(spec, inputs, bs)
        log.info("latency at batch %d (host timer)", bs)
        stats = latency.measure(lambda feeds=feeds: runner.infer(feeds), bs, L["warmup_ms"], L["min_iterations"],
                                L["min_seconds"], L["cv_warn_percent"])
        if stats.warning:
            log.warning("batch %d: %s", bs, stats.warning)
        out.append(stats.to_dict())
    return out


def _gpu_latency(backend, runner, spec, d, inputs, L: dict) -> dict:
    """CUDA-event latency of a GPU runner across its profile's batch sizes, and the backend's own latency
    tool's (trtexec) on the same engine where it has one on PATH."""
    batches = latency.batch_sweep(d.batch_sizes, runner.max_batch()) if spec.dynamic_batch else [1]
    settings = {"warmup_ms": L["warmup_ms"], "iterations": L["min_iterations"], "duration_s": L["min_seconds"],
                "spin_wait": GPU_TIMING["spin_wait"], "data_transfers": GPU_TIMING["data_transfers"],
                "cuda_graph": GPU_TIMING["cuda_graph"] and runner.cuda_graph != "off"}
    tool_name = backend.latency_tool_name()
    lat, tool, tool_missing = [], [], False
    for bs in batches:
        feeds = _feeds(spec, inputs, bs)
        events = latency.CudaBindingsEvents(runner.stream, runner.cudart)
        timer = latency.CudaEventTimer(events, spin_wait=GPU_TIMING["spin_wait"])
        step = runner.query(feeds, timer.mark)
        log.info("latency at batch %d (CUDA events, %s)", bs, runner.describe()["cuda_graph"])
        stats = latency.measure(step, bs, L["warmup_ms"], L["min_iterations"], L["min_seconds"], L["cv_warn_percent"],
                                timer=timer, depth=GPU_TIMING["depth"])
        check = _host_check(step, events, bs, L, stats)
        events.close()
        if stats.warning:
            log.warning("batch %d: %s", bs, stats.warning)
        lat.append({**stats.to_dict(), "cuda_graph": runner.describe()["cuda_graph"], "profile": runner.profile,
                    "host_check": check})
        if tool_name and runner.engine_path and not tool_missing:
            shapes = {n: list(np.shape(feeds[n])) for n in runner.input_names}
            rec = backend.latency_tool(runner, shapes, settings)
            if rec is None:
                tool_missing = True
                continue
            if rec.get("status") != "measured":
                log.warning("batch %d: %s did not measure: %s", bs, tool_name, rec.get("reason"))
            tool.append({"batch_size": bs, **rec})
    result = {"latency": lat, "runner": runner.describe(),
              "latency_method": {"timer": "CUDA events (cuda.bindings) on the runner's stream", **GPU_TIMING,
                                 "batch_sizes": batches}}
    if tool_name:
        result["trtexec"] = ({"status": "not run", "reason": f"{tool_name} is not on PATH"} if tool_missing
                             else tool)
    return result


def _host_check(step, events, batch: int, L: dict, stats) -> dict:
    """The same query timed by the host clock, each waited for before the next (one in flight): a check of
    the CUDA events. The host time adds the launch and the wait, so it should be at or a little above the
    events' latency; far below it, or far above it, says the events or the stream are not what was timed."""
    done = events.create()

    def waited() -> None:
        step()
        events.record(done)
        events.synchronize(done)

    host = latency.measure(waited, batch, L["warmup_ms"], L["min_iterations"], L["min_seconds"] / 2,
                           L["cv_warn_percent"])
    return {"timer": host.timer + ", each query waited for", "median_ms": host.median_ms, "p99_ms": host.p99_ms,
            "iterations": host.iterations,
            "host_over_events": host.median_ms / stats.median_ms if stats.median_ms > 0 else None}


def _speedup(baseline: Path | None, lat: list[dict]) -> dict:
    """PyTorch eager median latency over the engine's, at batch 1 (None where either is missing)."""
    from kiln.latency import median_at

    if baseline is None or not Path(baseline).is_file():
        return {"baseline": None, "speedup_vs_pytorch": None}
    b = read_json(baseline)
    base_ms, engine_ms = median_at(b if b.get("status") == "measured" else None), median_at({"latency": lat})
    info = {"path": str(baseline), "status": b.get("status"), "reason": b.get("reason"), "torch": b.get("torch"),
            "torch_device": b.get("torch_device"), "median_ms_batch1": base_ms}
    speedup = base_ms / engine_ms if base_ms and engine_ms else None
    return {"baseline": info, "speedup_vs_pytorch": speedup}


def run_rule(cfg, job) -> None:
    """Rule `validate`: one engine's parity, mAP and latency on its device."""
    w, i = job.wildcards, job.input
    validate(cfg, w.device, w.model, w.precision, i.engine, i.reference, i.reference_record, i.inputs,
             i.annotations, job.output[0], threads=job.threads, baseline=getattr(i, "baseline", None),
             engine_file=i.engine_file)
