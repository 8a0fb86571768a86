"""Stage `build`: one engine per device x model x precision, through the device's backend.

Its record (engine.json) also carries what running the engine needs besides the engine (``runtime``: the
model's preprocessing, layout, I/O names, decode thresholds and class names, and the device profile its
backend checks a host against), so an engine folder is self-contained for kiln.runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

from kiln import backends, coco, integrity, paths
from kiln.errors import KilnError
from kiln.specs import DeviceProfile, KilnConfig, ModelSpec, base_precision
from kiln.util import atomic_path, read_json, sha256, write_json

log = logging.getLogger(__name__)


def params(cfg: KilnConfig, device: str) -> dict:
    """What shapes this device's engines, as plain values Snakemake tracks."""
    return backends.engine_params(cfg.devices[device], cfg.validation["batch_size"])


# Device settings that neither shape an engine nor decide where it runs (the device's job list, its
# timing and placement): left out of the record, so that editing them rebuilds nothing.
NOT_RECORDED = ("precisions", "threads", "batch_sizes", "models", "cluster", "variants")


def model_params(cfg: KilnConfig, model: str) -> dict:
    """What of the model its engines' records carry (engine.json ``runtime``), as plain values Snakemake tracks."""
    return runtime_model(cfg.models[model])


def runtime_model(spec: ModelSpec) -> dict:
    """The model as an application running its engine needs it: preprocessing, layout, I/O, decode."""
    return {
        "name": spec.name, "layout": spec.layout, "input_size": list(spec.input_size),
        "preprocess": spec.preprocess, "resize_backend": spec.resize_backend,
        "dynamic_batch": spec.dynamic_batch, "dynamic_hw": spec.dynamic_hw, "nms": spec.nms, "input_names": list(spec.input_names), "output_names": list(spec.output_names),
        "decode": dict(spec.decode),
    }


def runtime_device(device: DeviceProfile) -> dict:
    """The device profile as its backend checks a host against it and loads its engines (kiln.runtime)."""
    return {k: v for k, v in dataclasses.asdict(device).items() if k not in NOT_RECORDED}


def runtime_record(spec: ModelSpec, device: DeviceProfile, annotations: str | Path | None) -> dict:
    """engine.json's ``runtime``: the model, its classes in label order (from the validation split), the device."""
    return {"model": runtime_model(spec), "classes": coco.categories(annotations) if annotations else [],
            "device": runtime_device(device)}


def build_engine(
    cfg: KilnConfig,
    device: str,
    model: str,
    precision: str,
    onnx_path: Path,
    record: Path,
    threads: int = 0,
    calib_npz: Path | None = None,
    engine_path: Path | None = None,
    annotations: Path | None = None,
    kept_record: Path | None = None,
) -> dict:
    """Build and write the engine and its record; a model the backend rejects is recorded as failed.

    `engine_path` is where the rule wants the engine (a local copy under a storage provider); the
    record names the engine by its artifact path either way. `annotations` (the model's validation
    split) gives the class names the record carries. `kept_record`: a mixed variant's record (rule fallback)
    where its engine is built from the strict source: its kept nodes go to the backend as ``kept_nodes``,
    held to the precision they were kept in, layer by layer (Backend.constrains_layers).
    """
    d = cfg.devices[device]
    backend = backends.get(d.backend)
    reason = backend.check_build_host(d)
    if reason:
        raise KilnError(f"device '{device}' cannot build on host {platform.node()}: {reason}")
    artifact = paths.fmt(paths.ENGINE_FILE, results=cfg.results, device=device, model=model, precision=precision)
    engine = Path(engine_path or artifact)
    info = {
        "device": device, "model": model, "precision": precision, "backend": d.backend,
        "backend_version": backend.version(), "host": platform.node(),
        "onnx": str(onnx_path), "onnx_sha256": sha256(onnx_path), "onnx_bytes": Path(onnx_path).stat().st_size,
        # Stamps let later checks trust an unchanged file without reading it (kiln/integrity.py).
        "onnx_stamp": integrity.stamp(onnx_path), "opset": d.opset,
        "runtime": runtime_record(cfg.models[model], d, annotations),
    }
    log.info("build %s/%s/%s with %s %s", device, model, precision, d.backend, backend.version())
    t0 = time.perf_counter()
    try:
        with atomic_path(engine) as tmp:
            meta = backend.build(
                onnx_path, tmp, d, base_precision(precision), threads=threads,  # a mixed variant builds as its strict one
                model_spec=cfg.models[model],
                validation_batch_size=cfg.validation["batch_size"],
                calib_npz=calib_npz,
                cache_dir=engine.parent.parent.parent,  # results/engines/{device}/: shared by its builds
                layers_json=engine.parent / "layers.json",
                **({"kept_nodes": kept_nodes(kept_record)} if kept_record else {}),
            )
    except KilnError as err:
        # The backend refused this model (unsupported op, ...): a result to report, not a crash.
        engine.unlink(missing_ok=True)
        info.update(status="failed", reason=str(err), build_seconds=round(time.perf_counter() - t0, 3))
        log.error("build FAILED: %s", err)
        write_json(record, info)
        return info
    info.update(status="built", engine=artifact, engine_sha256=sha256(engine),
                engine_bytes=engine.stat().st_size, engine_stamp=integrity.stamp(engine), **meta)
    write_json(record, info)
    log.info("build done in %.2f s: %s (%d bytes)", meta.get("build_seconds", 0), engine, info["engine_bytes"])
    return info


def kept_nodes(record: Path) -> dict[str, str]:
    """A mixed variant's kept nodes -> the precision they were kept in (fp16 for int8/fp8, fp32 for fp16)."""
    fb = read_json(record).get("fallback") or {}
    higher = "fp16" if fb.get("strict") in ("int8", "fp8") else "fp32"
    return {k["node"]: higher for k in fb.get("kept", [])}


def run_rule(cfg, job) -> None:
    """Rule `build`: one engine on its device's backend. A failed build leaves an empty engine file (a
    declared output, so it goes to storage with its record, which says why)."""
    w = job.wildcards
    calib = job.input.calib[0] if job.input.calib else None
    info = build_engine(cfg, w.device, w.model, w.precision, job.input.onnx, job.output[0], job.threads,
                        calib_npz=calib, engine_path=job.output.engine, annotations=job.input.annotations,
                        kept_record=job.input.kept[0] if job.input.kept else None)
    if info["status"] != "built":
        with atomic_path(job.output.engine):
            pass
