"""The build: builder configuration from a device, the serialized plan, and the engine's metadata.

:func:`build_plan` parses (:mod:`kiln.backends.trt.parser`), configures (:func:`make_config`),
builds and writes the plan with ``layers.json`` (:mod:`kiln.backends.trt.layers`).
:func:`build_params` lists the device settings that change an engine, for rule params.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.backends.trt.host import detect_host
from kiln.backends.trt.importer import FLAVORS, LABELS, major_minor, polygraphy_logs, polygraphy_trt
from kiln.backends.trt.layers import write_layers_json
from kiln.backends.trt.parser import parse_onnx
from kiln.backends.trt.profile import onnx_opset, profiles_for
from kiln.errors import KilnError

# Config value of devices.<d>.hardware_compatibility -> trt.HardwareCompatibilityLevel member.
HARDWARE_COMPATIBILITY = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}


def options_of(device) -> dict[str, Any]:
    """The builder options a device asks for, as recorded in the engine's metadata."""
    return {
        "workspace_mb": device.workspace_mb,
        "builder_optimization_level": device.builder_optimization_level,
        "hardware_compatibility": device.hardware_compatibility,
        "version_compatible": device.version_compatible,
        "tf32": device.tf32,
        "dla_core": device.dla_core,
        "int8_mode": device.int8_mode,
    }


def make_config(
    ns: SimpleNamespace,
    device,
    profiles: Sequence[dict[str, dict[str, list[int]]]],
    *,
    precision_flags: dict[str, bool] | None = None,
    network_hook: Callable[[SimpleNamespace, Any, Any], dict] | None = None,
    calibrator: Any = None,
    timing_cache: Path | None = None,
    compute_capabilities: Sequence[tuple[int, int]] | None = None,
    record: dict[str, Any] | None = None,
) -> Any:
    """A Polygraphy config loader with the device's builder options.

    ``precision_flags`` (fp16/bf16/int8/fp8 -> True), ``calibrator`` and ``network_hook(ns, network, config)``
    (per-layer precision constraints, kiln.backends.tensorrt.constrain_layers: a mixed variant built from the
    strict source; what it returns is recorded as ``precision_constraints``) are TensorRT < 11 weak typing; ``compute_capabilities`` are TensorRT-RTX's ahead-of-time targets. ``record``
    receives the builder flags actually set on the config (read back from it).
    """
    trt = ns.trt
    version = major_minor(trt.__version__)
    kwargs: dict[str, Any] = {
        "profiles": [to_polygraphy_profile(ns, p) for p in profiles],
        # DETAILED keeps per-layer information in the plan for the engine inspector (layers.json).
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
    }
    # builder_optimization_level exists from TensorRT 8.6 (and in every TensorRT-RTX).
    if ns.flavor == "tensorrt-rtx" or version >= (8, 6):
        kwargs["builder_optimization_level"] = device.builder_optimization_level
    if device.workspace_mb:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(device.workspace_mb) << 20}
    if device.hardware_compatibility != "none":
        member = HARDWARE_COMPATIBILITY[device.hardware_compatibility]
        level = getattr(trt.HardwareCompatibilityLevel, member, None)
        if level is None:
            raise KilnError(f"{LABELS[ns.flavor]} {trt.__version__} has no hardware compatibility level "
                            f"{member}: set 'devices.{device.name}.hardware_compatibility' to another level")
        kwargs["hardware_compatibility_level"] = level
    if device.version_compatible:
        kwargs["version_compatible"] = True
    if timing_cache is not None and Path(timing_cache).is_file():
        kwargs["load_timing_cache"] = str(timing_cache)

    if ns.flavor == "tensorrt-rtx":
        loader = ns.CreateConfigRTX(compute_capabilities=list(compute_capabilities or []) or None, **kwargs)
    else:
        dla = device.dla_core is not None
        loader = ns.pg.CreateConfig(
            tf32=device.tf32,
            calibrator=calibrator,
            use_dla=dla,
            allow_gpu_fallback=dla,  # the schema promises GPU fallback for layers DLA cannot run
            **(precision_flags or {}),
            **kwargs,
        )

    def finish(builder: Any, network: Any, config: Any) -> None:
        # TF32 for fp32 layers: CreateConfigRTX has no tf32 switch and TensorRT-RTX turns it on by
        # default; set it from the device either way (where this version still has the flag).
        if hasattr(trt.BuilderFlag, "TF32"):
            if device.tf32:
                config.set_flag(trt.BuilderFlag.TF32)
            else:
                config.clear_flag(trt.BuilderFlag.TF32)
        if device.dla_core is not None:
            config.DLA_core = int(device.dla_core)  # Polygraphy's use_dla always picks core 0
        if network_hook is not None:
            constraints = network_hook(ns, network, config)
            if record is not None:
                record["precision_constraints"] = constraints
        if record is not None:
            record["builder_flags"] = sorted(
                name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag)
            )
            if hasattr(config, "num_compute_capabilities"):  # TensorRT-RTX: read the AOT targets back
                record["compute_capability_targets"] = [
                    getattr(config.get_compute_capability(i), "name", "?")
                    for i in range(config.num_compute_capabilities)
                ]

    return ns.pg.PostprocessConfig(loader, finish)


def to_polygraphy_profile(ns: SimpleNamespace, profile: dict[str, dict[str, list[int]]]) -> Any:
    prof = ns.pg.Profile()
    for name, shapes in profile.items():
        prof.add(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    return prof


def serialize_network(ns: SimpleNamespace, network: tuple, config: Any, save_timing_cache: Path | None = None) -> Any:
    """Build: the serialized plan (a TensorRT IHostMemory) exactly as the builder returns it."""
    return ns.pg.engine_bytes_from_network(
        network, config=config, save_timing_cache=str(save_timing_cache) if save_timing_cache else None
    )


def save_plan(plan: Any, path: Path) -> int:
    """Write the plan's bytes as they are (no header) and return their count."""
    data = memoryview(plan)
    with open(path, "wb") as fh:
        fh.write(data)
    return data.nbytes



def build_plan(
    flavor: str,
    onnx_path: Path,
    engine_path: Path,
    device,
    *,
    source_precision: str,
    strongly_typed: bool,
    precision_flags: dict[str, bool] | None = None,
    network_hook: Callable[[SimpleNamespace, Any, Any], dict] | None = None,
    calibrator_factory: Callable[[SimpleNamespace, list], tuple[Any, Path | None]] | None = None,
    compute_capabilities: Sequence[tuple[int, int]] | None = None,
    timing_cache: Path | None = None,
    validation_batch_size: int | None = None,
    model_spec=None,
    layers_json: Path | None = None,
) -> dict[str, Any]:
    """Parse, configure, build and write the plan to ``engine_path``; return the engine's metadata.

    ``calibrator_factory(ns, profiles)`` returns (calibrator, cache path) for TensorRT < 11's
    INT8 calibration. ``timing_cache`` is loaded when it exists and updated after the build.
    ``layers.json`` goes to ``layers_json`` (default: beside the engine). Any refusal by the
    parser or the builder is a KilnError carrying TensorRT's reasons; nothing is written then.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    ns = polygraphy_trt(flavor)
    label = f"{LABELS[flavor]} {ns.trt.__version__}"
    t0 = time.perf_counter()
    profiles = profiles_for(device, onnx_path, validation_batch_size, model_spec)
    record: dict[str, Any] = {}
    from polygraphy.exception import PolygraphyException

    with polygraphy_logs() as errors:
        try:
            network = parse_onnx(ns, onnx_path, strongly_typed)
            calibrator, calib_cache = calibrator_factory(ns, profiles) if calibrator_factory else (None, None)
            config = make_config(ns, device, profiles, precision_flags=precision_flags, calibrator=calibrator,
                                 network_hook=network_hook,
                                 timing_cache=timing_cache, compute_capabilities=compute_capabilities, record=record)
            if timing_cache is not None:
                Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
            plan = serialize_network(ns, network, config, save_timing_cache=timing_cache)
        except PolygraphyException as err:
            reasons = "; ".join(dict.fromkeys(e for e in errors if e)) or str(err)
            raise KilnError(f"{label} could not build an engine from '{onnx_path}': {reasons}".replace("\n", " ")) from None
    build_seconds = time.perf_counter() - t0
    size = save_plan(plan, engine_path)
    layers_path = Path(layers_json) if layers_json else engine_path.parent / "layers.json"
    layers = write_layers_json(layers_path, ns, network[1], plan, strongly_typed)
    host = detect_host()
    return {
        "builder": label,
        "versions": {
            FLAVORS[flavor]: str(ns.trt.__version__),
            "polygraphy": ns.polygraphy_version,
            "onnx_opset": onnx_opset(onnx_path),
        },
        "build_seconds": round(build_seconds, 3),
        "source_precision": source_precision,
        "strongly_typed": strongly_typed,
        "builder_flags": record.get("builder_flags", []),
        "precision_flags": sorted(k for k, v in (precision_flags or {}).items() if v),
        # A mixed variant built from the strict source (TensorRT < 11): the layers held to the kept precision, and
        # the kept nodes no layer is named after.
        "precision_constraints": record.get("precision_constraints"),
        "compute_capabilities": [f"{a}.{b}" for a, b in (compute_capabilities or [])],
        # As the builder config holds them (TensorRT-RTX), e.g. ["SM89"]; empty for TensorRT.
        "compute_capability_targets": record.get("compute_capability_targets", []),
        "profiles": profiles,
        "options": options_of(device),
        "timing_cache": str(timing_cache) if timing_cache else None,
        "calibration_cache": str(calib_cache) if calib_cache else None,
        "plan_bytes": size,
        "layers_json": str(layers_path),
        "layers_source": layers["source"],
        "num_layers": layers["num_layers"],
        # Not "host": build_engine's record already has that key (the host's name).
        "build_host": host.as_dict(),
    }



def build_params(device, validation_batch_size: int) -> dict[str, Any]:
    """Device settings that change a TensorRT or TensorRT-RTX engine, as plain values.

    Batch sizes count because the default optimization profile spans them; the
    cluster hints, thread count and model list do not change an engine.
    """
    return {
        "compute_capability": device.compute_capability,
        "tensorrt": [device.tensorrt_min, device.tensorrt_max],
        "jetson": device.jetson,
        "opset": device.opset,
        "workspace_mb": device.workspace_mb,
        "builder_optimization_level": device.builder_optimization_level,
        "hardware_compatibility": device.hardware_compatibility,
        "version_compatible": device.version_compatible,
        "tf32": device.tf32,
        "int8_mode": device.int8_mode,
        "dla_core": device.dla_core,
        "profiles": [dict(p) for p in device.profiles],
        "batch_sizes": list(device.batch_sizes),
        "validation_batch_size": validation_batch_size,
    }
