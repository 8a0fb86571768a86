"""A crafted results tree for the page tests: engine and validation records shaped like a real run's
(tiny config: cpu validated, rtx built ahead of time, h100 not run), its summary written by kiln.summary."""

from __future__ import annotations

from pathlib import Path

from kiln import paths, summary
from kiln.config import load
from kiln.util import write_json
from tests.conftest import tiny_config

RTX_REASON = "TensorRT-RTX engines need a CUDA driver to run; this host has none"
H100_REASON = "TensorRT is not installed on this host"
MAP_FAIL = "map50 drop 0.0612 > 0.05"
BUILD_FAIL = "ONNX Runtime could not load the int8 graph: NOT_IMPLEMENTED: Could not find an implementation for ConvInteger"
RTX_BUILD_FAIL = "TensorRT-RTX: no implementation for node /decoder/GridSample"
BATCHES = (1, 4)
PICTURE_IDS = (3, 7)  # validation images with their detections drawn, per validated engine


def _latency(bs: int, p50: float) -> dict:
    return {"batch_size": bs, "iterations": 50, "seconds": 2.1, "min_ms": 0.8 * p50, "max_ms": 1.9 * p50,
            "mean_ms": 1.05 * p50, "median_ms": p50, "p90_ms": 1.2 * p50, "p95_ms": 1.3 * p50, "p99_ms": 1.5 * p50,
            "std_ms": 0.1 * p50, "cv_percent": 9.5 if bs == 1 else 1.2, "throughput_ips": 1000.0 * bs / (1.05 * p50),
            "timer": "host perf_counter",
            "warning": "coefficient of variation 9.5% exceeds 2.5%: the host was busy or clocks varied; "
                       "latency numbers may be unstable" if bs == 1 else None}


def _engine(cfg, device: str, model: str, precision: str, failed: str | None = None) -> dict:
    d = cfg.devices[device]
    R = cfg.results
    trt = d.backend != "onnxruntime"
    rec = {"device": device, "model": model, "precision": precision, "backend": d.backend,
           "backend_version": "1.7.1.116" if trt else "1.31.1", "host": "vm",
           "onnx": f"{R}/onnx/{model}/opset17/{precision}.onnx", "onnx_sha256": "ab" * 32, "opset": 17}
    if failed:
        rec.update(status="failed", reason=failed, build_seconds=0.4)
    else:
        suffix = ".engine" if trt else ".onnx"
        rec.update(status="built", engine=paths.fmt(paths.ENGINE_FILE, results=R, device=device, model=model,
                                                    precision=precision, suffix=suffix),
                   engine_sha256="cd" * 32, engine_bytes=(5_000_000 if trt else 4_500_000) // (2 if precision != "fp32" else 1),
                   build_seconds=4.2 if trt else 0.15)
        if trt:
            inputs = {"images": {"min": [1, 3, 256, 256], "opt": [1, 3, 256, 256], "max": [8, 3, 256, 256]}}
            if model == "rtdetr_demo":
                inputs["orig_target_sizes"] = {"min": [1, 2], "opt": [1, 2], "max": [8, 2]}
            rec.update(builder="TensorRT-RTX 1.7.1.116",
                       versions={"tensorrt_rtx": "1.7.1.116", "polygraphy": "0.53.6", "onnx_opset": 17},
                       compute_capability_targets=["SM89"], profiles=[inputs],
                       options={"builder_optimization_level": 1, "tf32": True, "int8_mode": "qdq"},
                       build_host={"gpu": None, "gpu_count": 0, "driver": False})
        else:
            rec.update(builder="onnxruntime 1.31.1", providers=["CPUExecutionProvider"])
    write_json(paths.fmt(paths.ENGINE_RECORD, results=R, device=device, model=model, precision=precision), rec)
    return rec


def _pictures(cfg, model: str, precision: str) -> list[str]:
    """Small PNGs where validation draws its detection pictures (paths.PICTURE)."""
    from PIL import Image, ImageDraw

    out = []
    for i in PICTURE_IDS:
        p = paths.fmt(paths.PICTURE, results=cfg.results, device="cpu", model=model, precision=precision, image_id=i)
        im = Image.new("RGB", (256, 256), (90, 110, 90))
        ImageDraw.Draw(im).rectangle([40 + 10 * i, 50, 150, 170], outline=(255, 200, 0), width=3)
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        im.save(p)
        out.append(p)
    return out


def _validation(cfg, model: str, precision: str, engine: dict, map_fail: bool = False) -> None:
    R = cfg.results
    v = {"device": "cpu", "model": model, "precision": precision, "host": "vm",
         "build": {k: engine.get(k) for k in ("status", "reason", "engine", "engine_bytes", "backend_version")}}
    if engine["status"] != "built":
        v.update(status="failed", reason=f"build failed: {engine['reason']}")
    else:
        ref = {"yolo_demo": 0.62, "rtdetr_demo": 0.55}[model]
        drop = {"fp32": 0.0, "fp16": 0.0004, "int8": 0.0612 if map_fail else 0.008}[precision]
        p50 = {"fp32": 20.0, "fp16": 14.0, "int8": 11.0}[precision] * (1.3 if model == "rtdetr_demo" else 1.0)
        par = {"outputs": {"output0": {"max_abs": 1e-3, "mean_abs": 1e-4, "max_rel": 1e-4,
                                       "cosine": 1.0 - {"fp32": 1e-7, "fp16": 2e-5, "int8": 4e-4}[precision]}}}
        if model == "rtdetr_demo":
            par = {"outputs": {n: {"max_abs": 1e-3, "mean_abs": 1e-4, "max_rel": 1e-4, "cosine": 0.9995}
                               for n in ("labels", "boxes", "scores")},
                   "detections": {"match_rate": 0.995, "matched": 199, "reference": 200}}
        v.update(validated={"engine_sha256": engine["engine_sha256"]},  # what the summary checks it against
                 parity=par,
                 accuracy={"map50_95": ref - drop, "map50": ref + 0.2 - drop, "reference_map50_95": ref,
                           "reference_map50": ref + 0.2, "map_drop": drop, "map50_drop": drop},
                 latency=[_latency(bs, p50 * bs ** 0.8) for bs in BATCHES],
                 pictures=_pictures(cfg, model, precision),
                 status="failed" if map_fail else "passed", reason=MAP_FAIL if map_fail else None)
    write_json(paths.fmt(paths.VALIDATION, results=R, device="cpu", model=model, precision=precision), v)


def _log(cfg, rule: str, name: str) -> None:
    p = Path(paths.fmt(paths.LOG, results=cfg.results, rule=rule, name=name))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"12:00:00 [{rule}] INFO: {name}\n")


def make_results(root: Path) -> Path:
    """Write the tree under root/results and its summary (kiln.summary); return the results folder."""
    config = tiny_config()
    config["results"] = str(root / "results")
    config["devices"]["cpu"]["batch_sizes"] = list(BATCHES)
    cfg = load(config, check_paths=False)
    for model in ("yolo_demo", "rtdetr_demo"):
        for rule in ("export", "simplify", "surgery", "reference"):
            _log(cfg, rule, f"{model}_opset17")
        for prec in ("fp32", "fp16", "int8"):
            _log(cfg, "quantize" if prec == "int8" else "precision", f"{model}_opset17_{prec}")
            failed = BUILD_FAIL if (model, prec) == ("rtdetr_demo", "int8") else None
            rec = _engine(cfg, "cpu", model, prec, failed)
            _validation(cfg, model, prec, rec, map_fail=(model, prec) == ("yolo_demo", "int8"))
            _log(cfg, "build", f"cpu_{model}_{prec}")
            if not failed:
                _log(cfg, "validate", f"cpu_{model}_{prec}")
            _engine(cfg, "rtx", model, prec, RTX_BUILD_FAIL if (model, prec) == ("rtdetr_demo", "int8") else None)
            _log(cfg, "build", f"rtx_{model}_{prec}")
    R = cfg.results
    summary.write_summary(cfg, Path(paths.fmt(paths.SUMMARY_JSON, results=R)),
                          Path(paths.fmt(paths.SUMMARY_CSV, results=R)), Path(paths.fmt(paths.SUMMARY_MD, results=R)),
                          cannot_build={"h100": H100_REASON}, cannot_run={"h100": H100_REASON, "rtx": RTX_REASON})
    return Path(R)


# What the summary of this tree says, row by row: (model, device, precision) -> status.
EXPECTED = {
    **{(m, "cpu", p): "passed" for m in ("yolo_demo", "rtdetr_demo") for p in ("fp32", "fp16")},
    ("yolo_demo", "cpu", "int8"): "failed", ("rtdetr_demo", "cpu", "int8"): "failed",
    **{(m, "rtx", p): "built" for m in ("yolo_demo", "rtdetr_demo") for p in ("fp32", "fp16", "int8")},
    ("rtdetr_demo", "rtx", "int8"): "failed",
    ("yolo_demo", "h100", "fp16"): "not run", ("rtdetr_demo", "h100", "fp16"): "not run",
}
