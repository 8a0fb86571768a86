"""What the TensorRT and TensorRT-RTX backends share, written once.

Both backends parse an ONNX file into a TensorRT network, configure a builder, serialize the
plan and describe it; they differ in which Python module they drive (``tensorrt`` or
``tensorrt_rtx``), whether precision comes from builder flags (TensorRT < 11) or from the
variant ONNX alone (strongly typed), and where an engine may be built and run. Everything
here takes a *flavor*, ``"tensorrt"`` or ``"tensorrt-rtx"``, and a TensorRT module passed as
``trt`` so that one code path serves both.

The build goes through Polygraphy (``create_network``, ``CreateConfig`` /
``CreateConfigRTX``, ``PostprocessConfig``, ``engine_bytes_from_network``). Polygraphy picks
its TensorRT module once per process from ``POLYGRAPHY_USE_TENSORRT_RTX``;
:func:`polygraphy_trt` binds it to the flavor asked for (see there). The engine file is the
serialized plan exactly as the builder returned it: no header or metadata is prepended, so
``trtexec --loadEngine``, Polygraphy and any TensorRT runtime read it as it is. What Kiln knows
about the build goes into the returned metadata and ``layers.json`` instead.

Host description (:func:`detect_host`) and the device guard (:func:`guard`) never need a GPU:
without one they report "no GPU" rather than fail.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from kiln import trt_ops
from kiln.errors import KilnError

log = logging.getLogger(__name__)

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
BUILDING_ON_DEVICES = "README: Building on devices"

# The schema's default for validation.batch_size (schemas/config.schema.yaml). The caller should
# pass the configured value (extra key validation_batch_size); this is only the fallback.
DEFAULT_VALIDATION_BATCH = 8

# Config value of devices.<d>.hardware_compatibility -> trt.HardwareCompatibilityLevel member.
HARDWARE_COMPATIBILITY = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}

# Highest ONNX opset each TensorRT release's ONNX parser documents: kiln/trt_ops.py holds the table
# (with its sources) for TensorRT and TensorRT-RTX, and the ops each version lacks.
PARSER_MAX_OPSET: dict[tuple[int, int], int] = trt_ops.PARSER_MAX_OPSET[trt_ops.TENSORRT]


# --------------------------------------------------------------------------------------------------
# Versions and modules


def parse_version(text: str | None) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); '' or None -> ()."""
    return tuple(int(p) for p in re.findall(r"\d+", str(text or "")))


def major_minor(text: str | None) -> tuple[int, int] | None:
    """'10.13.0.35' -> (10, 13); None when the text holds no version."""
    v = parse_version(text)
    if not v:
        return None
    return (v[0], v[1] if len(v) > 1 else 0)


def mm_str(v: tuple[int, int] | None) -> str:
    return f"{v[0]}.{v[1]}" if v else "?"


def parser_max_opset(tensorrt_version: str | tuple[int, int]) -> int | None:
    """Highest opset the ONNX parser of this TensorRT major.minor documents (None before 8.5)."""
    return trt_ops.parser_max_opset(trt_ops.TENSORRT, tensorrt_version)


def import_trt(flavor: str) -> ModuleType | None:
    """The real ``tensorrt`` / ``tensorrt_rtx`` module of this host, or None.

    A bare ``import tensorrt`` is not proof: the ``tensorrt-stubs`` package installs only .pyi
    files under ``tensorrt/``, which Python then imports as an empty namespace package. Such a
    module has no ``Builder`` and is not TensorRT (and it breaks ModelOpt's int8/fp8
    quantization, which trusts the import: keep those stubs out of the environment).
    """
    try:
        mod = importlib.import_module(FLAVORS[flavor])
    except Exception:  # ImportError, or OSError when its shared libraries cannot be loaded
        return None
    if not (hasattr(mod, "Builder") and hasattr(mod, "__version__")):
        return None
    return mod


def trt_version(flavor: str) -> str | None:
    mod = import_trt(flavor)
    return None if mod is None else str(mod.__version__)


# --------------------------------------------------------------------------------------------------
# Polygraphy, bound to one flavor


def polygraphy_trt(flavor: str) -> SimpleNamespace:
    """Polygraphy's TensorRT backend bound to TensorRT (``"tensorrt"``) or TensorRT-RTX.

    Polygraphy decides between ``tensorrt`` and ``tensorrt_rtx`` in ``polygraphy.config`` from
    ``POLYGRAPHY_USE_TENSORRT_RTX`` when that module is first imported, and every module of it
    that touches TensorRT keeps a lazy module object, ``trt = lazy_import_trt()``, made when that
    module is imported (``polygraphy.util`` and ``polygraphy.datatype`` among them, which other
    libraries such as ModelOpt's AutoCast import early). So setting the variable is not enough
    once Polygraphy is loaded: we also set ``polygraphy.config.USE_TENSORRT_RTX`` and re-bind
    each lazy ``trt`` that has not imported its module yet. One that already imported the other
    flavor cannot be re-bound safely (objects made from it live on): that process must not mix
    the two, which is a KilnError. Kiln builds each engine in its own job process.
    """
    rtx = flavor == "tensorrt-rtx"
    trt = import_trt(flavor)
    if trt is None:
        raise KilnError(f"{LABELS[flavor]} is not installed on this host")
    from polygraphy import config as pg_config
    from polygraphy.mod.trt_importer import lazy_import_trt

    wanted = FLAVORS[flavor]
    unloaded = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy") or module is None:
            continue
        lazy = vars(module).get("trt")
        if lazy is None or type(lazy).__name__ != "LazyModule":
            continue
        # vars() reads the instance dict directly: getattr would import the module.
        loaded = vars(lazy).get("module")
        if loaded is None:
            unloaded.append(module)
        elif loaded.__name__ != wanted:
            # Checked before anything is changed, so the process keeps working with its flavor.
            raise KilnError(
                f"Polygraphy in this process already uses {loaded.__name__}; {LABELS[flavor]} builds "
                f"must run in a process of their own (one engine job per process)"
            )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if rtx else "0"
    pg_config.USE_TENSORRT_RTX = rtx
    for module in unloaded:
        module.trt = lazy_import_trt()

    import polygraphy
    import polygraphy.backend.trt as pg
    from polygraphy.backend.trt import util as pg_util

    ns = SimpleNamespace(flavor=flavor, trt=trt, pg=pg, util=pg_util, polygraphy_version=polygraphy.__version__)
    if rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        ns.CreateConfigRTX = CreateConfigRTX
    return ns


class _ErrorList(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(level=logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        # Polygraphy prefixes its severity letter; the reason reads better without it.
        self.sink.append(re.sub(r"^\[[A-Z!]\]\s*", "", text))


@contextlib.contextmanager
def polygraphy_logs() -> Iterator[list[str]]:
    """Route Polygraphy's (and through it TensorRT's) log into Python logging while in the block.

    Yields a list that collects every ERROR-level line, so that a failed build can say why in
    its KilnError (Polygraphy itself raises only "Invalid Engine ..."). INFO lines (profiles,
    flags) land in the job's log through the "Polygraphy" logger.
    """
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    handler = _ErrorList(errors)
    pylog = logging.getLogger("Polygraphy")
    old = G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    pylog.addHandler(handler)
    try:
        yield errors
    finally:
        pylog.removeHandler(handler)
        G_LOGGER.use_python_logging_system = old


# --------------------------------------------------------------------------------------------------
# The host


@dataclass(frozen=True)
class HostInfo:
    """What this machine offers to build or run engines. Tests pass made-up ones to :func:`guard`."""

    compute_capability: str | None = None  # of the first visible GPU, e.g. "8.9"
    gpu: str | None = None  # its name
    gpu_count: int = 0
    driver: bool = False  # a CUDA driver answered
    cuda_driver: str | None = None  # CUDA version the driver supports, e.g. "12.4"
    jetson: bool = False
    tensorrt: str | None = None
    tensorrt_rtx: str | None = None
    probe: str = "none"  # how the GPU was found: cuda.bindings | nvidia-smi | none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe_cuda_bindings() -> dict[str, Any] | None:
    """Ask the CUDA driver through cuda-python; None when cuda.bindings is not installed."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return None
    ok = cu.CUresult.CUDA_SUCCESS
    try:
        (err,) = cu.cuInit(0)
    except Exception:  # cuda-bindings raises (DynamicLibNotFoundError) when libcuda is missing
        return {"driver": False, "probe": "cuda.bindings"}
    if err != ok:
        return {"driver": False, "probe": "cuda.bindings"}
    info: dict[str, Any] = {"driver": True, "probe": "cuda.bindings"}
    err, version = cu.cuDriverGetVersion()
    if err == ok:
        info["cuda_driver"] = f"{version // 1000}.{(version % 1000) // 10}"
    err, count = cu.cuDeviceGetCount()
    if err != ok or count == 0:
        return info
    info["gpu_count"] = int(count)
    err, dev = cu.cuDeviceGet(0)
    if err != ok:
        return info
    attr = cu.CUdevice_attribute
    err1, major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    err2, minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    if err1 == ok and err2 == ok:
        info["compute_capability"] = f"{major}.{minor}"
    err, name = cu.cuDeviceGetName(256, dev)
    if err == ok:
        info["gpu"] = bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip()
    return info


def _probe_nvidia_smi() -> dict[str, Any] | None:
    """Ask nvidia-smi; None when it is not on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {"driver": False, "probe": "nvidia-smi"}
    if out.returncode != 0:
        # nvidia-smi without a working driver exits non-zero ("couldn't communicate with the driver").
        return {"driver": False, "probe": "nvidia-smi"}
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    info: dict[str, Any] = {"driver": True, "probe": "nvidia-smi", "gpu_count": len(rows)}
    if rows:
        info["gpu"] = rows[0][0]
        if len(rows[0]) > 1 and re.fullmatch(r"\d+\.\d+", rows[0][1]):
            info["compute_capability"] = rows[0][1]
    try:
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        header = ""
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header)
    if m:
        info["cuda_driver"] = m.group(1)
    return info


def _is_jetson() -> bool:
    # L4T writes /etc/nv_tegra_release; the device tree names the module ("NVIDIA Jetson AGX Orin ...").
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        model = Path("/proc/device-tree/model").read_bytes().decode(errors="replace").lower()
    except OSError:
        return False
    return "jetson" in model


@functools.lru_cache(maxsize=1)
def _probe_gpu() -> dict[str, Any]:
    # Cached: the Snakefile asks every device's backend, and nvidia-smi costs a subprocess each time.
    for probe in (_probe_cuda_bindings, _probe_nvidia_smi):
        try:
            found = probe()
        except Exception as err:  # a broken driver install must not stop config loading
            log.warning("GPU probe %s failed: %s", probe.__name__, err)
            found = None
        if found is not None and (found.get("driver") or probe is _probe_nvidia_smi):
            return found
    return {}


def detect_host() -> HostInfo:
    """Describe this machine: GPU, CUDA driver, Jetson-ness, installed TensorRT / TensorRT-RTX.

    Tries cuda-python's ``cuda.bindings`` first, then ``nvidia-smi``; with neither (or no
    driver) the host has "no GPU". Never raises for a missing GPU or driver.
    """
    return HostInfo(
        jetson=_is_jetson(),
        tensorrt=trt_version("tensorrt"),
        tensorrt_rtx=trt_version("tensorrt-rtx"),
        **_probe_gpu(),
    )


def _cc(text: str | None) -> tuple[int, int] | None:
    return major_minor(text) if text else None


def _range_str(lo: str | None, hi: str | None) -> str:
    lo_v, hi_v = major_minor(lo), major_minor(hi or lo)
    return mm_str(lo_v) if lo_v == hi_v else f"{mm_str(lo_v)} to {mm_str(hi_v)}"


def guard(device, host: HostInfo, runtime: str = "TensorRT") -> str | None:
    """Why ``host`` is not the device that ``device``'s engines are for, or None when it is.

    Compares the host's GPU compute capability, its ``runtime`` version (TensorRT, or
    TensorRT-RTX for those devices) major.minor against ``tensorrt.min``..``tensorrt.max``, and
    Jetson-ness. With ``hardware_compatibility: ampere_plus`` any discrete GPU of compute
    capability 8.0 or newer will do. The message names what the device needs and what the host
    has, and the fix.
    """
    host_version = host.tensorrt_rtx if runtime == "TensorRT-RTX" else host.tensorrt
    want_cc, have_cc = _cc(device.compute_capability), _cc(host.compute_capability)
    ampere_plus = getattr(device, "hardware_compatibility", "none") == "ampere_plus"
    if want_cc is None:
        cc_ok = True
    elif ampere_plus:
        cc_ok = have_cc is not None and have_cc >= (8, 0)
    else:
        cc_ok = have_cc == want_cc
    lo, hi = major_minor(device.tensorrt_min), major_minor(device.tensorrt_max or device.tensorrt_min)
    have_v = major_minor(host_version)
    version_ok = lo is None or (have_v is not None and lo <= have_v <= hi)
    jetson_ok = bool(host.jetson) == bool(device.jetson)
    if cc_ok and version_ok and jetson_ok:
        return None

    needs, has = [], []
    if want_cc is not None:
        needs.append("an Ampere or newer GPU (compute capability 8.0+)" if ampere_plus
                     else f"compute capability {device.compute_capability}")
        has.append(host.compute_capability or "no GPU")
    if lo is not None:
        needs.append(f"{runtime} {_range_str(device.tensorrt_min, device.tensorrt_max)}")
        has.append(f"{runtime} {mm_str(have_v)}" if have_v else f"no {runtime}")
    need_text, have_text = " and ".join(needs), " and ".join(has)
    if not jetson_ok:
        need_text += " on a Jetson" if device.jetson else " on a discrete GPU"
        have_text += " on a Jetson" if host.jetson else ("" if have_cc is None else " on a discrete GPU")
    return (
        f"engine for device '{device.name}' needs {need_text}; this host has {have_text}: "
        f"run this job on that device ({BUILDING_ON_DEVICES})"
    )


def timing_cache_key(host: HostInfo, tensorrt_version: str | None = None) -> str:
    """A file-name-safe key for a timing cache: GPU, compute capability, CUDA and TensorRT versions.

    A timing cache holds kernel timings of one GPU model under one CUDA and TensorRT version;
    mixing hosts in one file would make the builder trust timings taken elsewhere. The caller
    puts the key into the cache's file name, e.g. ``timing-{key}.cache`` under a per-device
    folder, and passes that path as the ``timing_cache`` build option.
    """
    parts = [
        host.gpu or "nogpu",
        f"sm{(host.compute_capability or '0.0').replace('.', '')}",
        f"cuda{host.cuda_driver or 'none'}",
        f"trt{tensorrt_version or host.tensorrt or 'none'}",
    ]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


# --------------------------------------------------------------------------------------------------
# The ONNX side: inputs and optimization profiles


def onnx_inputs(onnx_path: Path) -> dict[str, list[int | None]]:
    """Graph inputs of an ONNX file (initializers excluded): name -> dims, None where dynamic."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def onnx_opset(onnx_path: Path) -> int | None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def default_profile(
    device, inputs: dict[str, list[int | None]], validation_batch_size: int | None = None, model_spec=None
) -> dict[str, dict[str, list[int]]]:
    """One optimization profile for the model's inputs.

    A dynamic batch axis (axis 0) spans 1 .. max(device.batch_sizes + [validation batch size]),
    optimized for the largest batch the latency measurement times (max(device.batch_sizes)).
    ``orig_target_sizes`` (RT-DETR) is (B, 2). Other dynamic axes of a 4-D image input take the
    model's input_size (H, W) when ``model_spec`` is given; anything else dynamic needs
    ``devices.<d>.profiles``.
    """
    vbs = DEFAULT_VALIDATION_BATCH if validation_batch_size is None else int(validation_batch_size)
    max_b = max([*device.batch_sizes, vbs])
    opt_b = max(device.batch_sizes)
    profile = {}
    for name, dims in inputs.items():
        if name == "orig_target_sizes":
            dims = [dims[0] if dims else None, 2]
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(dims):
            if d is not None:
                mins.append(d), opts.append(d), maxs.append(d)
            elif axis == 0:
                mins.append(1), opts.append(opt_b), maxs.append(max_b)
            elif model_spec is not None and len(dims) == 4 and axis in (2, 3):
                size = int(model_spec.input_size[axis - 2])
                mins.append(size), opts.append(size), maxs.append(size)
            else:
                raise KilnError(
                    f"input '{name}' has a dynamic axis {axis} that Kiln cannot size: give "
                    f"'devices.{device.name}.profiles' with min/opt/max shapes for it"
                )
        profile[name] = {"min": mins, "opt": opts, "max": maxs}
    return profile


def profiles_for(
    device, onnx_path: Path, validation_batch_size: int | None = None, model_spec=None
) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles of a build: ``device.profiles`` checked against the ONNX, or the default."""
    inputs = onnx_inputs(onnx_path)
    if not device.profiles:
        return [default_profile(device, inputs, validation_batch_size, model_spec)]
    out = []
    for k, given in enumerate(device.profiles):
        where = f"'devices.{device.name}.profiles[{k}]'"
        unknown = sorted(set(given) - set(inputs))
        if unknown:
            raise KilnError(f"{where} names {', '.join(unknown)}, not inputs of '{onnx_path}' "
                            f"(its inputs: {', '.join(inputs)}): fix the names")
        prof = {}
        for name, dims in inputs.items():
            if name not in given:
                if any(d is None for d in dims):
                    raise KilnError(f"{where} lacks input '{name}', which has dynamic axes: add its min/opt/max")
                prof[name] = {"min": list(dims), "opt": list(dims), "max": list(dims)}
                continue
            shapes = {key: [int(x) for x in given[name][key]] for key in ("min", "opt", "max")}
            for key, shape in shapes.items():
                if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                    raise KilnError(f"{where}.{name}.{key} is {shape} but the ONNX input is "
                                    f"{['?' if d is None else d for d in dims]}: match its rank and fixed axes")
            if not all(a <= b <= c for a, b, c in zip(shapes["min"], shapes["opt"], shapes["max"])):
                raise KilnError(f"{where}.{name}: needs min <= opt <= max on every axis")
            prof[name] = shapes
        out.append(prof)
    return out


def max_batch(profiles: Sequence[dict[str, dict[str, list[int]]]]) -> int:
    return max(shapes["max"][0] for prof in profiles for shapes in prof.values() if shapes["max"])


# --------------------------------------------------------------------------------------------------
# Parsing


def _call(obj: Any, name: str) -> Any:
    """obj.name() when the binding has it (IParserError gained node_name/node_operator after 8.5)."""
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:
        return None


def parser_error_text(err: Any, nodes: Sequence[Any] = ()) -> str:
    """One parser error as 'node 3 'name' (op Domain:Type): description [CODE]'."""
    index = _call(err, "node")
    index = int(index) if isinstance(index, int) else -1
    node = nodes[index] if 0 <= index < len(nodes) else None
    name = _call(err, "node_name") or (node.name if node is not None else "")
    op = _call(err, "node_operator") or (node.op_type if node is not None else "")
    if node is not None and node.domain not in ("", "ai.onnx") and node.op_type == op:
        op = f"{node.domain}:{op}"
    code = _call(err, "code")
    code = getattr(code, "name", None) or (str(code) if code is not None else "")
    desc = str(_call(err, "desc") or err).strip()
    where = f"node {index} '{name}' (op {op})" if index >= 0 else "the graph"
    return f"{where}: {desc}" + (f" [{code}]" if code else "")


def parse_onnx(ns: SimpleNamespace, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """Parse an ONNX file into a new network; every parser error ends up in the KilnError.

    Polygraphy's ``network_from_onnx_path`` would do the same parse, but on failure it only logs
    the errors and raises "Could not parse ONNX correctly"; Kiln's summary needs each failing
    node's name, op type and the parser's reason, so the parser is driven here, on a network
    from Polygraphy's ``create_network`` (which knows which creation flags this version takes).
    """
    import onnx

    trt = ns.trt
    builder, network = ns.pg.create_network(strongly_typed=strongly_typed)
    logger = ns.util.get_trt_logger()
    trt.init_libnvinfer_plugins(logger, "")  # as Polygraphy's ONNX loader does: plugin ops resolve
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if ok and parser.num_errors == 0:
        return builder, network, parser
    proto = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(proto.graph.node)
    errors = [parser_error_text(parser.get_error(i), nodes) for i in range(parser.num_errors)]
    raise KilnError(
        f"{LABELS[ns.flavor]} {trt.__version__} cannot parse '{onnx_path}': "
        + "; ".join(errors or ["the parser gave no reason (is the file a valid ONNX model?)"])
        + ": " + (parse_hints(ns.flavor, trt.__version__, parser, proto)
                  or "replace or remove these nodes (export, surgery) or build this model for another device")
    )


def parse_hints(flavor: str, version: str, parser: Any, proto: Any) -> str:
    """Kiln's op table's advice (kiln/trt_ops.py) for the failing nodes it knows, '; '-joined ('' if none)."""
    nodes = list(proto.graph.node)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    out: dict[str, None] = {}
    for i in range(parser.num_errors):
        index = _call(parser.get_error(i), "node")
        node = nodes[index] if isinstance(index, int) and 0 <= index < len(nodes) else None
        if node is not None and node.op_type in trt_ops.RULES_BY_OP:
            out[trt_ops.hint(flavor, version, node.op_type, node.name, opset)] = None
    return "; ".join(out)


# --------------------------------------------------------------------------------------------------
# Builder configuration


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
    calibrator: Any = None,
    timing_cache: Path | None = None,
    compute_capabilities: Sequence[tuple[int, int]] | None = None,
    record: dict[str, Any] | None = None,
) -> Any:
    """A Polygraphy config loader with the device's builder options.

    ``precision_flags`` (fp16/bf16/int8/fp8 -> True) and ``calibrator`` are TensorRT < 11 weak
    typing; ``compute_capabilities`` are TensorRT-RTX's ahead-of-time targets. ``record``
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


# --------------------------------------------------------------------------------------------------
# layers.json


def network_layers(network: Any) -> list[dict[str, Any]]:
    """Layers of a parsed network: name, type and each output's name, dtype and shape."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outputs.append({"name": t.name, "dtype": getattr(t.dtype, "name", str(t.dtype)),
                            "shape": [int(d) for d in t.shape]})
        layers.append({"index": i, "name": layer.name, "type": getattr(layer.type, "name", str(layer.type)),
                       "outputs": outputs})
    return layers


def inspector_layers(ns: SimpleNamespace, plan: Any) -> dict[str, Any] | None:
    """The engine inspector's JSON of the built plan, or None when this host cannot deserialize it.

    Deserializing needs a CUDA driver (and for TensorRT-RTX a GPU of a target compute
    capability), so it is only tried where the host probe found a driver.
    """
    if not _probe_gpu().get("driver"):
        return None
    trt = ns.trt
    try:
        runtime = trt.Runtime(ns.util.get_trt_logger())
        engine = runtime.deserialize_cuda_engine(bytes(memoryview(plan)))
        if engine is None:
            return None
        inspector = engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as err:  # a runtime refusal is a reason to fall back, not to fail the build
        log.info("engine inspector unavailable (%s); layers.json lists the parsed network", err)
        return None


def write_layers_json(path: Path, ns: SimpleNamespace, network: Any, plan: Any, strongly_typed: bool) -> dict[str, Any]:
    """Write layers.json, from the engine inspector when possible, else from the parsed network."""
    from kiln.util import write_json

    info = inspector_layers(ns, plan)
    builder = f"{LABELS[ns.flavor]} {ns.trt.__version__}"
    if info is not None:
        layers = info.get("Layers", [])
        doc = {"source": "engine_inspector", "builder": builder, "num_layers": len(layers), "layers": layers,
               "engine": {k: v for k, v in info.items() if k != "Layers"}}
    else:
        layers = network_layers(network)
        doc = {
            "source": "network",
            "builder": builder,
            "note": (
                "layers of the parsed network before TensorRT's fusions and kernel choice: the engine "
                "inspector needs the engine deserialized, which needs a CUDA driver"
                + (" and a GPU of a target compute capability" if ns.flavor == "tensorrt-rtx" else "")
                + ("" if strongly_typed else "; a weakly typed network's dtypes are those parsed, not the "
                   "precisions the builder picks under its flags")
            ),
            "strongly_typed": strongly_typed,
            "num_layers": len(layers),
            "layers": layers,
        }
    write_json(path, doc)
    return doc


# --------------------------------------------------------------------------------------------------
# The build


def build_plan(
    flavor: str,
    onnx_path: Path,
    engine_path: Path,
    device,
    *,
    source_precision: str,
    strongly_typed: bool,
    precision_flags: dict[str, bool] | None = None,
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


# --------------------------------------------------------------------------------------------------
# Running
#
# Engines run through the TensorRT (or TensorRT-RTX) runtime directly, with cuda-python
# (``cuda.bindings.runtime``) for streams, memory, events and CUDA graphs: the latency measurement
# needs the H2D copies, the engine's enqueue and the D2H copies as separate steps on one stream, and
# CUDA graphs around the enqueue, which Polygraphy's TrtRunner does not expose. Polygraphy still
# loads the engine (its logs carry TensorRT's reasons when deserializing fails).

# Host storage of each TensorRT data type: numpy dtype holding its bits, and bits per element.
# bf16 travels as uint16 bit patterns and fp8 (E4M3) as uint8 codes; the runner converts them.
TRT_STORAGE: dict[str, tuple[str | None, int]] = {
    "FLOAT": ("float32", 32), "HALF": ("float16", 16), "BF16": ("uint16", 16), "INT8": ("int8", 8),
    "INT32": ("int32", 32), "INT64": ("int64", 64), "BOOL": ("bool", 8), "UINT8": ("uint8", 8),
    "FP8": ("uint8", 8), "E8M0": ("uint8", 8), "INT4": (None, 4), "FP4": (None, 4),
}


def _fp8_e4m3_table():
    """float32 value of each of the 256 FP8 E4M3FN codes (bias 7, no infinities, S.1111.111 is NaN)."""
    import numpy as np

    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(exp == 0xF) & (man == 0x7)] = np.nan
    return value.astype(np.float32)


def to_storage(array, dtype: str):
    """A feed as the contiguous host bits of TensorRT type ``dtype`` (a DataType member name)."""
    import numpy as np

    storage, _ = TRT_STORAGE.get(dtype, (None, 0))
    if storage is None:
        raise KilnError(f"engine I/O of type {dtype} is not supported by Kiln's runner: keep the model's "
                        f"inputs and outputs in fp32, fp16, bf16, fp8 or an integer type")
    a = np.asarray(array)
    if dtype == "BF16":
        f = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest, ties to even
        nan = np.isnan(a.astype(np.float32))
        return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)
    if dtype == "FP8":
        table = _fp8_e4m3_table()
        finite = np.flatnonzero(np.isfinite(table))
        order = finite[np.argsort(table[finite], kind="stable")]
        values = table[order]
        x = np.clip(np.ascontiguousarray(a, dtype=np.float32), -448.0, 448.0)  # E4M3FN saturates at 448
        hi = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
        lo = hi - 1
        d_lo, d_hi = np.abs(x - values[lo]), np.abs(values[hi] - x)
        # Nearest value; a tie goes to the code with an even mantissa.
        pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((order[hi] & 1) == 0))
        codes = np.where(pick_hi, order[hi], order[lo]).astype(np.uint8)
        return np.where(np.isnan(a.astype(np.float32)), np.uint8(0x7F), codes).astype(np.uint8)
    return np.ascontiguousarray(a, dtype=storage)


def from_storage(raw, dtype: str):
    """Host bits of TensorRT type ``dtype`` as a numpy array of the nearest numpy type (bf16, fp8 -> float32)."""
    import numpy as np

    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "FP8":
        return _fp8_e4m3_table()[np.asarray(raw, dtype=np.uint8)]
    return np.asarray(raw)


def storage_nbytes(shape: Sequence[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return (n * TRT_STORAGE[dtype][1] + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """One I/O tensor of an engine: shape -1 where dynamic; (min, opt, max) per profile for inputs."""

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]
    profiles: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()


def describe_io(engine: Any, trt: Any) -> list[TensorInfo]:
    """The engine's I/O tensors in binding order, with their profile ranges."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        profiles = ()
        if is_input:
            ranges = []
            for k in range(max(1, engine.num_optimization_profiles)):
                try:
                    dims = [tuple(int(d) for d in x) for x in engine.get_tensor_profile_shape(name, k)]
                except Exception:  # an input outside every profile (static shape)
                    dims = []
                if len(dims) != 3 or not all(dims):
                    if any(d < 0 for d in shape):
                        raise KilnError(f"engine input '{name}' has dynamic shape {list(shape)} but no profile {k}")
                    dims = [shape, shape, shape]
                ranges.append(tuple(dims))
            profiles = tuple(ranges)
        dtype = engine.get_tensor_dtype(name)
        out.append(TensorInfo(name, is_input, getattr(dtype, "name", str(dtype)), shape, profiles))
    return out


def select_profile(tensors: Sequence[TensorInfo], shapes: dict[str, Sequence[int]]) -> int:
    """The first optimization profile whose min..max range holds every input shape."""
    inputs = [t for t in tensors if t.is_input]
    missing = [t.name for t in inputs if t.name not in shapes]
    if missing:
        raise KilnError(f"no feed for engine input(s) {', '.join(missing)}")
    count = max((len(t.profiles) for t in inputs), default=0)
    for k in range(count):
        fits = True
        for t in inputs:
            lo, _, hi = t.profiles[k]
            shape = tuple(int(d) for d in shapes[t.name])
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                fits = False
                break
        if fits:
            return k
    ranges = "; ".join(
        f"profile {k}: " + ", ".join(f"{t.name} {list(t.profiles[k][0])}..{list(t.profiles[k][2])}" for t in inputs)
        for k in range(count)
    )
    given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise KilnError(f"input shapes {given} fit none of the engine's optimization profiles ({ranges}): "
                    f"time batch sizes within them, or rebuild with 'devices.<d>.profiles' covering them")


def max_batch_of(tensors: Sequence[TensorInfo]) -> int | None:
    """Largest batch (axis 0) every input accepts in some profile; None for a static batch axis."""
    inputs = [t for t in tensors if t.is_input and t.shape and t.shape[0] < 0]
    if not inputs:
        return None
    count = min(len(t.profiles) for t in inputs)
    return max(min(t.profiles[k][2][0] for t in inputs) for k in range(count)) if count else None


class CudaRuntime:
    """``cuda.bindings.runtime`` with its (error, values...) results checked: a failure is a KilnError."""

    def __init__(self, cudart: Any = None):
        if cudart is None:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                raise KilnError(
                    "running TensorRT engines needs cuda-python: pip install 'cuda-bindings' of the driver's "
                    "CUDA major (cuda-bindings 12.x or 13.x)"
                ) from None
        self.rt = cudart
        self.ok = cudart.cudaError_t.cudaSuccess

    def error_name(self, err: Any) -> str:
        try:
            _, text = self.rt.cudaGetErrorString(err)
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:
            text = ""
        return f"{getattr(err, 'name', err)}" + (f" ({text})" if text else "")

    def __call__(self, fn: str, *args: Any) -> Any:
        result = getattr(self.rt, fn)(*args)
        err, rest = result[0], tuple(result[1:])
        if err != self.ok:
            raise KilnError(f"CUDA {fn} failed: {self.error_name(err)}")
        return rest[0] if len(rest) == 1 else (rest or None)


def capture_graph(rt: CudaRuntime, stream: Any, enqueue: Callable[[], Any]) -> tuple[Any | None, str | None]:
    """Capture what ``enqueue()`` puts on ``stream`` into an executable CUDA graph.

    Returns (graph exec, None), or (None, reason) when the work cannot be captured (an enqueue that
    synchronizes, allocates, or returns False under capture); the stream is usable either way.
    """
    cudart = rt.rt
    rt("cudaStreamBeginCapture", stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    reason = None
    try:
        if enqueue() is False:
            reason = "the enqueue returned False under stream capture"
    except Exception as err:  # the runtime refuses an operation it cannot capture
        reason = f"the enqueue failed under stream capture: {err}"
    finally:
        result = cudart.cudaStreamEndCapture(stream)  # always leave capture mode
    err, graph = result[0], result[1]
    if reason is None and err != rt.ok:
        reason = f"cudaStreamEndCapture: {rt.error_name(err)}"
    if reason is None:
        ierr, graph_exec = cudart.cudaGraphInstantiate(graph, 0)[:2]
        cudart.cudaGraphDestroy(graph)
        if ierr == rt.ok:
            return graph_exec, None
        reason = f"cudaGraphInstantiate: {rt.error_name(ierr)}"
    elif err == rt.ok and graph is not None:
        cudart.cudaGraphDestroy(graph)
    cudart.cudaGetLastError()  # clear the error the failed capture left
    return None, reason


class _Buffer:
    """Device memory and pinned host memory of one tensor, grown when a larger shape needs it."""

    def __init__(self, rt: CudaRuntime, nbytes: int):
        self.rt = rt
        self.nbytes = max(int(nbytes), 1)
        self.device = rt("cudaMalloc", self.nbytes)
        self.host = rt("cudaMallocHost", self.nbytes)

    def host_bytes(self, nbytes: int):
        import ctypes

        import numpy as np

        return np.frombuffer((ctypes.c_uint8 * max(nbytes, 1)).from_address(int(self.host)), dtype=np.uint8)[:nbytes]

    def free(self) -> None:
        if self.device is not None:
            self.rt.rt.cudaFree(self.device)
            self.rt.rt.cudaFreeHost(self.host)
            self.device = self.host = None


class TrtEngineRunner:
    """A TensorRT / TensorRT-RTX engine behind kiln.backends.base.Runner, plus what latency needs.

    * Dynamic shapes: each feed's shape is set on the context and picks the first optimization
      profile that holds it (several profiles are supported); output shapes follow.
    * Any I/O dtype TensorRT has a host form for: fp32, fp16, int8/32/64, bool, uint8, and bf16 and
      fp8 (converted from and to float32 on the host).
    * CUDA graphs around the enqueue, on by default: captured after a plain enqueue for each new
      input shape (TensorRT); TensorRT-RTX uses its runtime's built-in whole-graph capture. When an
      engine cannot be captured the runner enqueues normally and says why (``graph_note``).
    * ``query(feeds, mark)`` stages the feeds once in pinned memory and returns the step the latency
      harness times: H2D copies, mark("h2d"), the engine's enqueue, mark("compute"), D2H copies,
      mark("d2h"), all on ``stream`` (a ``cuda.bindings`` stream; ``cudart`` is its module).
    """

    def __init__(self, flavor: str, engine_path: Path, device, threads: int = 0, cuda_graph: bool = True):
        from polygraphy.exception import PolygraphyException

        rt = CudaRuntime()
        ns = polygraphy_trt(flavor)
        try:
            with polygraphy_logs() as errors:
                engine = ns.pg.engine_from_path(str(engine_path))
                if engine is None:
                    raise PolygraphyException("the runtime returned no engine")
        except PolygraphyException as err:
            reasons = "; ".join(dict.fromkeys(errors)) or str(err)
            raise KilnError(f"{LABELS[flavor]} cannot load '{engine_path}': {reasons}".replace("\n", " ")) from None
        self._setup(ns.trt, engine, rt, flavor, cuda_graph)
        self.engine_path = Path(engine_path)

    @classmethod
    def from_engine(cls, trt: Any, engine: Any, cudart: Any, flavor: str = "tensorrt",
                    cuda_graph: bool = True) -> TrtEngineRunner:
        """A runner over an already deserialized engine (and a given CUDA runtime module)."""
        self = cls.__new__(cls)
        self._setup(trt, engine, CudaRuntime(cudart), flavor, cuda_graph)
        self.engine_path = None
        return self

    def _setup(self, trt: Any, engine: Any, rt: CudaRuntime, flavor: str, cuda_graph: bool) -> None:
        self.trt, self.engine, self.rt, self.flavor = trt, engine, rt, flavor
        self.cudart = rt.rt
        self.tensors = describe_io(engine, trt)
        self.input_names = tuple(t.name for t in self.tensors if t.is_input)
        self.output_names = tuple(t.name for t in self.tensors if not t.is_input)
        self._info = {t.name: t for t in self.tensors}
        self.stream = rt("cudaStreamCreateWithFlags", self.cudart.cudaStreamNonBlocking)
        self.graph_note: str | None = None
        strategy = getattr(trt, "CudaGraphStrategy", None)
        if cuda_graph and flavor == "tensorrt-rtx" and strategy is not None and hasattr(engine, "create_runtime_config"):
            # TensorRT-RTX captures and replays graphs itself (per shape); a manual capture would need
            # engines built with REQUIRE_USER_ALLOCATION.
            config = engine.create_runtime_config()
            config.cuda_graph_strategy = strategy.WHOLE_GRAPH_CAPTURE
            self.context = engine.create_execution_context(runtime_config=config)
            self.cuda_graph = "tensorrt-rtx runtime whole-graph capture"
        else:
            self.context = engine.create_execution_context()
            self.cuda_graph = "stream capture" if cuda_graph else "off"
        if self.context is None:
            raise KilnError(f"{LABELS.get(flavor, flavor)} could not create an execution context (out of GPU memory?)")
        self.profile = 0
        self._buffers: dict[str, _Buffer] = {}
        self._bound: tuple | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._graph: Any = None
        self._graph_tried = False

    # ---- shapes and memory

    def max_batch(self) -> int | None:
        return max_batch_of(self.tensors)

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        key = tuple(shapes[n] for n in self.input_names if n in shapes)
        if key == self._bound:
            return
        k = select_profile(self.tensors, shapes)
        stream = int(self.stream)
        if k != self.profile:
            if not self.context.set_optimization_profile_async(k, stream):
                raise KilnError(f"TensorRT refused optimization profile {k}")
            self.rt("cudaStreamSynchronize", self.stream)
            self.profile = k
        for name in self.input_names:
            if not self.context.set_input_shape(name, tuple(shapes[name])):
                raise KilnError(f"TensorRT refused shape {list(shapes[name])} for input '{name}'")
        bound = {n: tuple(shapes[n]) for n in self.input_names}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise KilnError(f"output '{name}' has a data-dependent shape {list(shape)}, which Kiln's runner does "
                                f"not support: export the model with fixed-size outputs (e.g. top-k)")
            bound[name] = shape
        for name, shape in bound.items():
            need = storage_nbytes(shape, self._info[name].dtype)
            buf = self._buffers.get(name)
            if buf is None or buf.nbytes < need:
                if buf is not None:
                    buf.free()
                buf = self._buffers[name] = _Buffer(self.rt, need)
            if not self.context.set_tensor_address(name, int(buf.device)):
                raise KilnError(f"TensorRT refused the address of tensor '{name}'")
        self.shapes = bound
        self._bound = key
        # A captured graph holds the old shapes (and maybe addresses): capture again for these.
        self._drop_graph()

    def _stage(self, feeds: dict[str, Any]) -> None:
        """Copy the feeds into pinned host memory, converted to the engine's input types."""
        for name in self.input_names:
            data = to_storage(feeds[name], self._info[name].dtype)
            host = self._buffers[name].host_bytes(data.nbytes)
            host[:] = data.reshape(-1).view("uint8")

    def _copies(self, names: Sequence[str], kind: str) -> None:
        cudart = self.cudart
        direction = getattr(cudart.cudaMemcpyKind, kind)
        for name in names:
            buf = self._buffers[name]
            n = storage_nbytes(self.shapes[name], self._info[name].dtype)
            if kind == "cudaMemcpyHostToDevice":
                self.rt("cudaMemcpyAsync", buf.device, buf.host, n, direction, self.stream)
            else:
                self.rt("cudaMemcpyAsync", buf.host, buf.device, n, direction, self.stream)

    # ---- execution

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self.cudart.cudaGraphExecDestroy(self._graph)
        self._graph = None
        self._graph_tried = False

    def _execute(self) -> Any:
        return self.context.execute_async_v3(int(self.stream))

    def _enqueue(self) -> None:
        if self.cuda_graph == "stream capture":
            if not self._graph_tried:
                self._graph_tried = True
                self.graph_note = None  # says why the graph of the current shapes could not be captured
                # The first enqueue after a shape change may do work that cannot be captured.
                if not self._execute():
                    raise KilnError("TensorRT could not enqueue the engine (execute_async_v3 returned False)")
                self.rt("cudaStreamSynchronize", self.stream)
                capturable = getattr(self.context, "is_stream_capturable", None)
                if capturable is not None and not capturable(int(self.stream)):
                    self.graph_note = "the execution context reports the stream is not capturable"
                else:
                    self._graph, reason = capture_graph(self.rt, self.stream, self._execute)
                    if reason:
                        self.graph_note = reason
                        log.warning("CUDA graph capture failed, enqueuing without graphs: %s", reason)
            if self._graph is not None:
                self.rt("cudaGraphLaunch", self._graph, self.stream)
                return
        if not self._execute():
            raise KilnError("TensorRT could not enqueue the engine (execute_async_v3 returned False)")

    def _shapes_of(self, feeds: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        import numpy as np

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KilnError(f"no feed for engine input(s) {', '.join(missing)}")
        return {n: tuple(int(d) for d in np.shape(feeds[n])) for n in self.input_names}

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run one batch: copy in, enqueue (through the CUDA graph when there is one), copy out, wait."""
        self._bind(self._shapes_of(feeds))
        self._stage(feeds)
        self._copies(self.input_names, "cudaMemcpyHostToDevice")
        self._enqueue()
        self._copies(self.output_names, "cudaMemcpyDeviceToHost")
        self.rt("cudaStreamSynchronize", self.stream)
        out = {}
        for name in self.output_names:
            info, shape = self._info[name], self.shapes[name]
            storage = TRT_STORAGE[info.dtype][0]
            raw = self._buffers[name].host_bytes(storage_nbytes(shape, info.dtype)).copy().view(storage)
            out[name] = from_storage(raw, info.dtype).reshape(shape)
        return out

    def query(self, feeds: dict[str, Any], mark: Callable[[str], None] = lambda name: None) -> Callable[[], None]:
        """The step latency times for these feeds: H2D, engine, D2H on ``stream``, marked, not waited for."""
        self.infer(feeds)  # binds shapes, stages the feeds, captures the graph, checks it runs

        def step() -> None:
            self._copies(self.input_names, "cudaMemcpyHostToDevice")
            mark("h2d")
            self._enqueue()
            mark("compute")
            self._copies(self.output_names, "cudaMemcpyDeviceToHost")
            mark("d2h")

        return step

    def describe(self) -> dict[str, Any]:
        return {
            "runner": f"{LABELS.get(self.flavor, self.flavor)} execute_async_v3 on a cuda.bindings stream",
            "optimization_profiles": self.engine.num_optimization_profiles,
            "cuda_graph": self.cuda_graph if not self.graph_note else f"off ({self.graph_note})",
            "io": [{"name": t.name, "input": t.is_input, "dtype": t.dtype, "shape": list(t.shape)}
                   for t in self.tensors],
        }

    def close(self) -> None:
        if getattr(self, "rt", None) is None:
            return
        with contextlib.suppress(Exception):
            self.rt("cudaStreamSynchronize", self.stream)
        self._drop_graph()
        for buf in self._buffers.values():
            buf.free()
        self._buffers = {}
        self.context = None
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.rt = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


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
