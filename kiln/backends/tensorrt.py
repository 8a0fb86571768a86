"""TensorRT 8.5 to 11.x as a device: engines built and run on the device itself (or its twin).

How a precision becomes an engine depends on the device's TensorRT:

* TensorRT >= 11 builds strongly typed networks only: every precision is built from its own
  variant ONNX (AutoCast fp16/bf16, ModelOpt Q/DQ int8/fp8); ``best`` and the INT8 calibrator are
  gone and refused at config load.
* TensorRT < 11 (8.5, 8.6, 10.x) builds fp32/fp16/bf16/best from the fp32 ONNX with builder
  precision flags (weak typing: TensorRT picks per layer among the enabled precisions). int8 is
  the Q/DQ variant (``int8_mode: qdq``; strongly typed from 10.0) or the fp32 ONNX with an entropy
  calibrator over the calibration split (``int8_mode: calibrator``). fp8 is the Q/DQ variant,
  strongly typed.

Everything TensorRT and TensorRT-RTX share (Polygraphy build, profiles, builder options, timing
cache, parser errors, layers.json, host guard) is in the package :mod:`kiln.backends.trt`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.backends.trt import builder
from kiln.backends.trt.backend import TrtBackend
from kiln.backends.trt.host import HostInfo, detect_host, guard, timing_cache_key
from kiln.backends.trt.importer import import_trt, major_minor, mm_str, parser_max_opset, trt_version
from kiln.backends.trt.runner import TrtEngineRunner
from kiln.errors import KilnError

NAME = "tensorrt"
FLAVOR = "tensorrt"

# The range of TensorRT releases this backend is written for.
SUPPORTED = ((8, 5), (11, 99))
# ModelOpt's Q/DQ variants (int8, fp8) come out at opset 19 (measured with ModelOpt 0.47: fp16 scales
# need it), AutoCast bf16 at opset 22. A TensorRT whose parser stops below that cannot read them.
VARIANT_MIN_OPSET = {"int8": 19, "fp8": 19, "bf16": 22}
CALIBRATION_CACHE = "calibration.cache"


def is_available() -> bool:
    return import_trt(FLAVOR) is not None


def version() -> str | None:
    return trt_version(FLAVOR)


def _device_version(device) -> tuple[int, int] | None:
    """The device's TensorRT major.minor (its tensorrt.min; check_device keeps min and max on one side of 11)."""
    return major_minor(getattr(device, "tensorrt_min", None))


def check_device(device) -> list[str]:
    """Config-time problems of a tensorrt device, each with its fix."""
    problems = []
    if not device.compute_capability:
        problems.append("'compute_capability' is missing: set the GPU's compute capability, e.g. "
                        "compute_capability: \"8.9\" (nvidia-smi --query-gpu=compute_cap --format=csv)")
    if not device.tensorrt_min:
        problems.append("'tensorrt.min' is missing: set the TensorRT major.minor this device runs, "
                        "e.g. tensorrt: {min: \"10.13\"}")
    if problems:
        return problems
    cc = major_minor(device.compute_capability)
    lo = major_minor(device.tensorrt_min)
    hi = major_minor(device.tensorrt_max or device.tensorrt_min)
    lo_s, hi_s = mm_str(lo), mm_str(hi)
    if lo > hi:
        return [f"'tensorrt.min' {lo_s} is above 'tensorrt.max' {hi_s}: swap them"]
    if lo < SUPPORTED[0] or hi > SUPPORTED[1]:
        problems.append(f"TensorRT {lo_s if lo < SUPPORTED[0] else hi_s} is outside what Kiln's tensorrt "
                        f"backend supports (8.5 to 11.x): set 'tensorrt' within that range")
    if lo < (11, 0) <= hi:
        problems.append(f"'tensorrt' spans {lo_s} to {hi_s}, across TensorRT 11, which builds strongly typed "
                        f"networks only where older versions use builder precision flags: make one device "
                        f"for the 10.x (or 8.x) range and one for 11.x")
    trt11 = lo >= (11, 0)

    for p in device.precisions:
        if p == "fp8" and cc < (8, 9):
            problems.append(f"precision 'fp8' needs compute capability 8.9 or newer (FP8 tensor cores: Ada, "
                            f"Hopper, Blackwell); this device has {device.compute_capability}: remove 'fp8' "
                            f"from its precisions")
        if p == "bf16" and lo < (9, 0):
            problems.append(f"precision 'bf16' needs TensorRT 9 or newer; this device runs TensorRT {lo_s}: "
                            f"remove 'bf16' from its precisions or raise 'tensorrt.min'")
        if p == "bf16" and cc < (8, 0):
            problems.append(f"precision 'bf16' needs compute capability 8.0 or newer (Ampere); this device has "
                            f"{device.compute_capability}: remove 'bf16' from its precisions")
        if p == "best" and trt11:
            problems.append("precision 'best' lets TensorRT < 11 pick precisions through builder flags; "
                            "TensorRT 11 builds strongly typed networks only: use the fp16 and int8 "
                            "precisions (variant ONNX) instead")
    if trt11 and device.int8_mode == "calibrator":
        problems.append("'int8_mode: calibrator' needs the INT8 calibrator, which TensorRT 11 removed (strongly "
                        "typed networks only): use 'int8_mode: qdq' (ModelOpt's Q/DQ variant)")

    max_opset = parser_max_opset(lo)
    if max_opset is not None:
        if device.opset > max_opset:
            problems.append(f"'opset' {device.opset} is above what TensorRT {lo_s}'s ONNX parser supports "
                            f"({max_opset}): set 'opset: {max_opset}' or lower (docs/models.md: what TensorRT "
                            f"8.5's parser takes)")
        for p in device.precisions:
            src = source_precision(p, device)
            need = VARIANT_MIN_OPSET.get(src) if src != "fp32" else None
            if need is not None and need > max_opset:
                fix = ("use 'int8_mode: calibrator' (int8 from the fp32 ONNX)" if p == "int8"
                       else f"remove '{p}' from its precisions or raise 'tensorrt.min'")
                problems.append(f"precision '{p}' is built from ModelOpt's {src} variant, which is opset {need}, "
                                f"above what TensorRT {lo_s}'s ONNX parser supports ({max_opset}): {fix}")

    if device.dla_core is not None and not device.jetson:
        problems.append("'dla_core' is set but the device is not a Jetson (DLA cores exist on Jetson AGX "
                        "Xavier and Orin only): remove 'dla_core' or set 'jetson: true'")
    if device.hardware_compatibility != "none":
        if lo < (8, 6):
            problems.append(f"'hardware_compatibility' needs TensorRT 8.6 or newer; this device runs {lo_s}: "
                            f"set it to none")
        if device.jetson:
            problems.append("'hardware_compatibility' is for discrete GPUs, not Jetson: set it to none")
        if device.hardware_compatibility == "ampere_plus" and cc < (8, 0):
            problems.append(f"'hardware_compatibility: ampere_plus' needs compute capability 8.0 or newer; "
                            f"this device has {device.compute_capability}: set it to none")
    if device.version_compatible and lo < (8, 6):
        problems.append(f"'version_compatible' needs TensorRT 8.6 or newer; this device runs {lo_s}: set it to false")
    return problems


build_params = builder.build_params


def source_precision(precision: str, device=None) -> str:
    """Which precision-variant ONNX the engine of ``precision`` is built from on this device."""
    v = _device_version(device) if device is not None else None
    if v is None or v >= (11, 0):
        return "fp32" if precision == "best" else precision
    if precision in ("fp32", "fp16", "bf16", "best"):
        return "fp32"  # builder flags on the fp32 ONNX
    if precision == "int8":
        return "int8" if device.int8_mode == "qdq" else "fp32"
    return precision  # fp8: the Q/DQ variant


def build_settings(precision: str, device, tensorrt_version: str) -> dict[str, Any]:
    """How ``precision`` is built on this TensorRT: source variant, typing, builder flags, calibrator.

    Pure (no TensorRT needed), so the decision is testable anywhere.
    """
    v = major_minor(tensorrt_version)
    src = source_precision(precision, device)
    if v >= (11, 0):
        return {"source_precision": src, "strongly_typed": True, "precision_flags": {}, "calibrate": False}
    if src in ("int8", "fp8") and v >= (10, 0):
        # The Q/DQ variant carries every type (int8/fp8 where quantized, fp16 elsewhere).
        return {"source_precision": src, "strongly_typed": True, "precision_flags": {}, "calibrate": False}
    flags: dict[str, bool] = {}
    if src == "int8":
        # TensorRT 8.x has no strongly typed mode: the Q/DQ variant needs INT8 for its quantized
        # layers and FP16 for the fp16 tensors AutoCast left between them.
        flags.update(int8=True, fp16=True)
    if precision in ("fp16", "best"):
        flags["fp16"] = True
    if precision == "bf16" or (precision == "best" and v >= (9, 0) and
                               major_minor(device.compute_capability) >= (8, 0)):
        flags["bf16"] = True
    calibrate = (precision == "int8" and src == "fp32") or precision == "best"
    if calibrate:
        flags["int8"] = True
    return {"source_precision": src, "strongly_typed": False, "precision_flags": flags, "calibrate": calibrate}


def calibration_batches(calib_npz: Path, model_spec, batch_size: int):
    """Feeds for the INT8 calibrator: the calibration split (kiln.inputs .npz) in batches.

    Uses the first ``model_spec.calibration['images']`` images, as the Q/DQ variant's
    calibration does, so both int8 paths see the same data.
    """
    from kiln.batches import load

    data = load(calib_npz)
    n = min(len(data), int(model_spec.calibration["images"]))
    for start in range(0, n, batch_size):
        yield data.feeds(model_spec, start, min(n, start + batch_size))


# A kept node's precision (kiln.precision.fallback keeps int8/fp8 nodes in fp16) -> trt.DataType member.
LAYER_TYPES = {"fp16": "HALF", "fp32": "FLOAT"}


def constrain_layers(ns: SimpleNamespace, network: Any, config: Any, kept: dict[str, str]) -> dict[str, list]:
    """Per-layer precision constraints on a weakly typed network (TensorRT < 11): every layer named as a kept
    ONNX node (the ONNX parser names a node's layer after it) computes and writes its float outputs in the
    kept precision, and the builder must obey (BuilderFlag.OBEY_PRECISION_CONSTRAINTS). TensorRT only:
    TensorRT-RTX is strongly typed and has no such flag.

    `kept` maps ONNX node names to "fp16" or "fp32". Returns the layers constrained and the kept nodes
    that matched no layer (a node the parser fused away or renamed): engine.json records both."""
    trt = ns.trt
    floats = {trt.DataType.FLOAT, trt.DataType.HALF}
    constrained, matched = [], set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        precision = kept.get(layer.name)
        if precision is None:
            continue
        dtype = getattr(trt.DataType, LAYER_TYPES[precision])
        layer.precision = dtype
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        for j in outputs:
            layer.set_output_type(j, dtype)
        constrained.append({"layer": layer.name, "index": i, "precision": precision, "outputs": outputs})
        matched.add(layer.name)
    if constrained:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        if any(c["precision"] == "fp16" for c in constrained):
            config.set_flag(trt.BuilderFlag.FP16)  # a HALF constraint needs fp16 kernels allowed
    return {"constrained": constrained, "unmatched": [n for n in kept if n not in matched]}


def _calibrator_factory(engine_path: Path, extra: dict[str, Any]):
    calib_npz, spec = extra.get("calib_npz"), extra.get("model_spec")
    if not calib_npz or spec is None:
        raise KilnError("INT8 calibration needs the calibration split and the model: pass calib_npz and "
                        "model_spec to the tensorrt backend's build (or use 'int8_mode: qdq')")
    cache = Path(extra.get("calib_cache") or Path(engine_path).parent / CALIBRATION_CACHE)

    def factory(ns: SimpleNamespace, profiles: list) -> tuple[Any, Path]:
        # Calibrate afresh each build: TensorRT would otherwise trust a cache left from older data.
        cache.unlink(missing_ok=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Batches as large as the profile optimizes for; the last profile is the calibration profile.
        batch = max(1, profiles[-1]["images"]["opt"][0] if "images" in profiles[-1] else 1)
        loader = calibration_batches(Path(calib_npz), spec, batch)
        calibrator = ns.pg.Calibrator(loader, cache=str(cache), BaseClass=ns.trt.IInt8EntropyCalibrator2)
        return calibrator, cache

    return factory


def needs_calibration(precision: str, device) -> bool:
    """Whether building this precision runs an INT8 calibrator (so needs the calibration split)."""
    return precision == "best" or (precision == "int8" and device.int8_mode == "calibrator")


def build(onnx_path: Path, engine_path: Path, device, precision: str, threads: int = 0, **extra) -> dict:
    """Build the engine of ``precision`` from ``onnx_path`` (the variant source_precision names).

    ``threads`` is unused: the TensorRT builder has no thread setting. Keys read from ``extra``:

    * ``calib_npz``: the model's calibration split (kiln.inputs .npz); needed for ``int8`` with
      ``int8_mode: calibrator`` and for ``best`` (which enables INT8).
    * ``calib_cache``: where the calibration cache is written (default ``calibration.cache`` beside
      the engine); it is a per-device artifact and is rewritten by every calibrating build.
    * ``model_spec``: the model's ModelSpec (calibration feeds and image count; input size for
      dynamic H/W profiles).
    * ``timing_cache``: timing-cache file to load (when present) and update; or
    * ``cache_dir``: folder where ``timing-<key>.cache`` is kept, the key from
      :func:`kiln.backends.trt.host.timing_cache_key` (GPU, CUDA and TensorRT versions).
    * ``kept_nodes``: ONNX node -> precision ("fp16"), a mixed variant's kept nodes (kiln.precision.fallback)
      when its engine is built from the strict source: per-layer constraints (:func:`constrain_layers`).
    * ``validation_batch_size``: the validation batch size, so the default profile covers it.
    * ``layers_json``: where layers.json goes (default beside the engine).
    """
    trt = import_trt(FLAVOR)
    if trt is None:
        raise KilnError("TensorRT is not installed on this host")
    s = build_settings(precision, device, str(trt.__version__))
    timing = extra.get("timing_cache")
    if timing is None and extra.get("cache_dir"):
        # One timing cache per GPU/CUDA/TensorRT combination, shared by the device's builds.
        key = timing_cache_key(detect_host(), str(trt.__version__))
        timing = Path(extra["cache_dir"]) / f"timing-{key}.cache"
    return builder.build_plan(
        FLAVOR,
        onnx_path,
        engine_path,
        device,
        source_precision=s["source_precision"],
        strongly_typed=s["strongly_typed"],
        precision_flags=s["precision_flags"],
        calibrator_factory=_calibrator_factory(engine_path, extra) if s["calibrate"] else None,
        # A mixed variant built from the strict source (weak typing): its kept nodes held to their precision.
        network_hook=((lambda ns, network, config: constrain_layers(ns, network, config, kept))
                      if (kept := extra.get("kept_nodes")) and not s["strongly_typed"] else None),
        timing_cache=Path(timing) if timing else None,
        validation_batch_size=extra.get("validation_batch_size"),
        model_spec=extra.get("model_spec"),
        layers_json=extra.get("layers_json"),
    )


def check_host(device, host: HostInfo | None = None) -> str | None:
    """Why this host cannot run (or build) ``device``'s engines, or None when it is that device."""
    if host is None:
        if not is_available():
            return "TensorRT is not installed on this host"
        host = detect_host()
    elif not host.tensorrt:
        return "TensorRT is not installed on this host"
    return guard(device, host, runtime="TensorRT")


def check_build_host(device, host: HostInfo | None = None) -> str | None:
    """TensorRT engines are built where they run: the same guard as check_host."""
    return check_host(device, host)


def load_runner(engine_path: Path, device, threads: int = 0) -> TrtEngineRunner:
    reason = check_host(device)
    if reason:
        raise KilnError(f"cannot run '{engine_path}' here: {reason}")
    return TrtEngineRunner(FLAVOR, Path(engine_path), device, threads)


class TensorRT(TrtBackend):
    """TensorRT 8.5 to 11.x: engines built and run on the device; builder flags and calibrators before 11."""

    name = NAME
    label = "TensorRT"
    parser_flavor = FLAVOR




    def source_precision(self, precision: str, device) -> str:
        return source_precision(precision, device)

    def needs_calibration(self, device, precision: str) -> bool:
        return needs_calibration(precision, device)

    def constrains_layers(self, device) -> bool:
        return not self.strongly_typed(device)  # TensorRT < 11: per-layer precision constraints (constrain_layers)

    def strongly_typed(self, device) -> bool:
        v = _device_version(device)
        return v is None or v >= (11, 0)




