"""TensorRT-RTX as a device: engines compiled ahead of time on any host, run on RTX-class GPUs.

TensorRT-RTX builds strongly typed networks only, so each precision is built from its own
variant ONNX (AutoCast fp16/bf16, ModelOpt Q/DQ int8/fp8); there are no precision flags, no
INT8 calibrator and no ``best``. The ahead-of-time (AOT) build needs no GPU: it targets the
device's ``compute_capability`` through the builder config (``IBuilderConfig.
set_compute_capability``, driven by Polygraphy's ``CreateConfigRTX(compute_capabilities=...)``),
and the engine then runs only on GPUs of that compute capability, where TensorRT-RTX finishes
compiling its kernels just in time. Running needs a CUDA driver and such a GPU; TensorRT-RTX
does not run on compute capability 9.0 (Hopper).

Shared machinery (Polygraphy build, profiles, parser errors, layers.json, host probe) is in
the package :mod:`kiln.backends.trt`.
"""

from __future__ import annotations

from pathlib import Path

from kiln.backends.trt import builder
from kiln.backends.trt.backend import TrtBackend
from kiln.backends.trt.host import BUILDING_ON_DEVICES, HostInfo, detect_host, guard
from kiln.backends.trt.importer import import_trt, major_minor, mm_str, trt_version
from kiln.backends.trt.runner import TrtEngineRunner
from kiln.errors import KilnError

NAME = "tensorrt-rtx"
FLAVOR = "tensorrt-rtx"
INSTALL_HINT = "pip install tensorrt-rtx-cu13 (or tensorrt-rtx-cu12 for a CUDA 12 driver)"

# Compute capabilities TensorRT-RTX can target: the members of tensorrt_rtx.ComputeCapability
# (SM75, SM80, SM86, SM89, SM120, SM121 in 1.7.1.116). Used at config load, where TensorRT-RTX
# need not be installed; the installed module's own list wins at build time.
KNOWN_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
# The TensorRT-RTX support matrix (1.0 to 1.5): FP8 from 8.9 (Ada), BF16 from 8.0 (not Turing 7.5).
PRECISION_MIN_CC = {"fp8": (8, 9), "bf16": (8, 0)}
HOPPER = "9.0"


def is_available() -> bool:
    return import_trt(FLAVOR) is not None


def version() -> str | None:
    return trt_version(FLAVOR)


def target_compute_capabilities(trt=None) -> tuple[str, ...]:
    """Compute capabilities the installed TensorRT-RTX can target (its ComputeCapability enum)."""
    trt = trt or import_trt(FLAVOR)
    if trt is None:
        return KNOWN_COMPUTE_CAPABILITIES
    out = []
    for name in trt.ComputeCapability.__members__:
        digits = name[2:] if name.startswith("SM") else ""
        if digits.isdigit() and len(digits) >= 2:
            out.append(f"{int(digits[:-1])}.{digits[-1]}")
    return tuple(out)


def check_device(device) -> list[str]:
    """Config-time problems of a tensorrt-rtx device, each with its fix."""
    problems = []
    cc = device.compute_capability
    if not cc:
        problems.append("'compute_capability' is missing: TensorRT-RTX compiles ahead of time for one GPU "
                        "generation: set it, e.g. compute_capability: \"8.9\" (RTX 40xx) or \"12.0\" (RTX 50xx)")
    elif cc == HOPPER:
        problems.append("TensorRT-RTX does not run on compute capability 9.0 (Hopper: H100, H200): use "
                        "backend 'tensorrt' for this GPU")
    elif cc not in KNOWN_COMPUTE_CAPABILITIES:
        problems.append(f"TensorRT-RTX cannot target compute capability {cc} (it targets "
                        f"{', '.join(KNOWN_COMPUTE_CAPABILITIES)}): fix 'compute_capability' or use backend 'tensorrt'")
    have = major_minor(cc) if cc else None
    for p in device.precisions:
        if p == "best":
            problems.append("precision 'best' needs builder precision flags, which TensorRT-RTX does not have "
                            "(strongly typed networks only): use the fp16 and int8 precisions (variant ONNX)")
        need = PRECISION_MIN_CC.get(p)
        if need and have and have < need:
            problems.append(f"precision '{p}' needs compute capability {mm_str(need)} or newer on "
                            f"TensorRT-RTX; this device has {cc}: remove '{p}' from its precisions")
    if device.int8_mode == "calibrator":
        problems.append("'int8_mode: calibrator' is not available on TensorRT-RTX (strongly typed networks only): "
                        "use 'int8_mode: qdq' (ModelOpt's Q/DQ variant)")
    if device.jetson:
        problems.append("TensorRT-RTX is for discrete RTX GPUs on Linux x86-64 and Windows, not Jetson: "
                        "use backend 'tensorrt'")
    if device.dla_core is not None:
        problems.append("'dla_core' has no meaning on TensorRT-RTX (no DLA): remove it")
    if device.hardware_compatibility != "none":
        # Seen with 1.7.1.116: "setHardwareCompatibilityLevel() is unsupported in TensorRT-RTX".
        problems.append("'hardware_compatibility' is unsupported in TensorRT-RTX (its engines target the "
                        "compute capability set): set it to none")
    if device.version_compatible:
        # Seen with 1.7.1.116: the build fails loading libnvinfer_lean.so.1, which TensorRT-RTX does not ship.
        problems.append("'version_compatible' is not available on TensorRT-RTX: set it to false")
    if device.tensorrt_min and device.tensorrt_max and \
            major_minor(device.tensorrt_min) > major_minor(device.tensorrt_max):
        problems.append("'tensorrt.min' is above 'tensorrt.max' (for tensorrt-rtx these are TensorRT-RTX "
                        "versions): swap them")
    return problems


build_params = builder.build_params


def source_precision(precision: str, device=None) -> str:
    """Strongly typed: every precision is its own variant ONNX."""
    return precision


def _targets(device, trt) -> list[tuple[int, int]]:
    cc = device.compute_capability
    if not cc:
        raise KilnError(f"device '{device.name}' has no compute_capability: TensorRT-RTX needs one to target")
    if cc not in target_compute_capabilities(trt):
        raise KilnError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc} "
                        f"(it targets {', '.join(target_compute_capabilities(trt))})")
    return [major_minor(cc)]


def build(onnx_path: Path, engine_path: Path, device, precision: str, threads: int = 0, **extra) -> dict:
    """Compile the engine ahead of time for ``device.compute_capability`` from the precision's variant ONNX.

    No GPU is needed. ``threads`` is unused (the builder has no thread setting). Keys read from
    ``extra``: ``validation_batch_size`` (so the default profile covers the validation batch),
    ``model_spec`` (input size for dynamic H/W profiles), ``layers_json`` (default beside the
    engine). ``timing_cache`` is ignored: TensorRT-RTX documents that a timing cache has no effect
    on its engines (TensorRT-RTX 1.1 release notes), so none is kept.
    """
    trt = import_trt(FLAVOR)
    if trt is None:
        raise KilnError(f"TensorRT-RTX is not installed on this host: {INSTALL_HINT}")
    if precision == "best" or device.int8_mode == "calibrator":
        raise KilnError("TensorRT-RTX builds strongly typed networks only: no 'best', no INT8 calibrator")
    return builder.build_plan(
        FLAVOR,
        onnx_path,
        engine_path,
        device,
        source_precision=source_precision(precision, device),
        strongly_typed=True,
        compute_capabilities=_targets(device, trt),
        validation_batch_size=extra.get("validation_batch_size"),
        model_spec=extra.get("model_spec"),
        layers_json=extra.get("layers_json"),
    )


def check_build_host(device, host: HostInfo | None = None) -> str | None:
    """Any host with TensorRT-RTX installed builds (ahead of time, GPU or not): `host` does not matter."""
    if not is_available():
        return f"TensorRT-RTX is not installed on this host: {INSTALL_HINT}"
    return None


def check_host(device, host: HostInfo | None = None) -> str | None:
    """Why this host cannot run ``device``'s engines, or None.

    Running needs TensorRT-RTX, a CUDA driver and a GPU of the device's compute capability
    (never 9.0, which TensorRT-RTX refuses), and a TensorRT-RTX within 'tensorrt' when given.
    """
    if host is None:
        if not is_available():
            return f"TensorRT-RTX is not installed on this host: {INSTALL_HINT}"
        host = detect_host()
    if not host.driver:
        return "TensorRT-RTX engines need a CUDA driver to run; this host has none"
    if not host.compute_capability:
        return "TensorRT-RTX engines need a GPU to run; this host's CUDA driver sees none"
    if host.compute_capability == HOPPER:
        return (f"TensorRT-RTX does not run on compute capability 9.0 (this host's {host.gpu or 'GPU'}): "
                f"run device '{device.name}' on a GPU of compute capability {device.compute_capability} "
                f"({BUILDING_ON_DEVICES})")
    return guard(device, host, runtime="TensorRT-RTX")


def load_runner(engine_path: Path, device, threads: int = 0) -> TrtEngineRunner:
    reason = check_host(device)
    if reason:
        raise KilnError(f"cannot run '{engine_path}' here: {reason}")
    return TrtEngineRunner(FLAVOR, Path(engine_path), device, threads)


class TensorRTRTX(TrtBackend):
    """TensorRT-RTX: strongly typed engines compiled ahead of time on any host, run on RTX-class GPUs."""

    name = NAME
    label = "TensorRT-RTX"
    parser_flavor = FLAVOR






    def builds_on_device(self, device) -> bool:
        return False  # ahead of time, on any host

    def needs_gpu(self, device, rule: str) -> bool:
        return rule != "build"  # the ahead-of-time build needs none; running the engines does


