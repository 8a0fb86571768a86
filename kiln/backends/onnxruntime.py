"""ONNX Runtime as a device: CPU provider everywhere, CUDA provider where onnxruntime-gpu is installed.

The "engine" is the session-optimized model ONNX Runtime writes itself
(graph optimizations applied, provider-independent level), so a build is a
real step that can fail on an unsupported op, and validation loads exactly
the file that was built.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from kiln.backends.base import ModuleBackend, Runner, ServeFormat
from kiln.errors import KilnError

NAME = "onnxruntime"

# Providers Kiln's backend drives. What each runs (fp16, bf16, int8, fp8) is asked of the runtime on
# this host (kiln.backends.ort_capabilities), not tabled: a new onnxruntime release can add kernels.
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
# EXTENDED fusions are provider-independent; ALL adds layout changes tied to this CPU.
BUILD_LEVEL = "ORT_ENABLE_EXTENDED"


def is_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    if not is_available():
        return None
    import onnxruntime

    return onnxruntime.__version__


def check_device(device) -> list[str]:
    """Config-time problems of an onnxruntime device, each with its fix."""
    problems = [
        f"provider '{provider}' is not supported by Kiln's onnxruntime backend: use {' or '.join(PROVIDERS)}"
        for provider in device.providers
        if provider not in PROVIDERS
    ]
    if problems or not is_available():
        return problems
    from kiln.backends.ort_capabilities import capabilities, runnable

    main = device.providers[0]
    can = runnable(main)
    for p in device.precisions:
        if p not in can:
            problems.append(
                f"precision '{p}' cannot run on ONNX Runtime's {main}: remove it from "
                f"'devices.{device.name}.precisions' (it can do {', '.join(can)}; {capabilities(main)[p].note}) "
                f"or target it on a TensorRT device"
            )
    return problems


def check_host(device) -> str | None:
    """Why this host cannot run `device`, or None when it can."""
    if not is_available():
        return "onnxruntime is not installed on this host"
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in device.providers if p not in have]
    if missing:
        # The CPU wheel imported in place of onnxruntime-gpu (both installed, one module name) says so.
        return _both_wheels() or f"ONNX Runtime {ort.__version__} here lacks {', '.join(missing)} (has {', '.join(have)})"
    if device.providers[0] == "CPUExecutionProvider":
        return None
    from kiln.backends.trt.host import detect_host

    host = detect_host()
    if not host.driver or not host.compute_capability:
        return f"{device.providers[0]} needs an NVIDIA GPU with its driver; this host has none"
    if device.compute_capability and device.compute_capability != host.compute_capability:
        return (f"device '{device.name}' is compute capability {device.compute_capability}, this host's "
                f"{host.gpu or 'GPU'} is {host.compute_capability}: run it on its own GPU (README: Building on devices)")
    return None


def _both_wheels() -> str | None:
    """onnxruntime and onnxruntime-gpu share the module name: with both installed, either may be imported."""
    from importlib import metadata

    names = {d.metadata["Name"].lower() for d in metadata.distributions() if d.metadata["Name"]}
    if {"onnxruntime", "onnxruntime-gpu"} <= names:
        return ("both onnxruntime (CPU) and onnxruntime-gpu are installed here, and they share the module name: "
                "pip uninstall onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu alone")
    return None


def check_build_host(device) -> str | None:
    """ONNX Runtime builds where it runs: the optimized model is provider-specific."""
    return check_host(device)


def build_params(device, validation_batch_size: int) -> dict:
    """Device settings that change the optimized model: only the providers."""
    return {"providers": list(device.providers)}


def source_precision(precision: str, device=None) -> str:
    """ONNX Runtime runs the precision-variant ONNX itself (AutoCast fp16, Q/DQ int8)."""
    return precision


def build_level(device, precision: str) -> str:
    """The graph-optimization level a build uses: EXTENDED, or lower where the probe found EXTENDED fails."""
    from kiln.backends.ort_capabilities import LEVELS, capabilities

    level = capabilities(device.providers[0])[precision].graph_optimization_level or BUILD_LEVEL
    return max(level, BUILD_LEVEL, key=LEVELS.index)


def _session_options(threads: int, optimized_path: Path | None = None, level: str = BUILD_LEVEL):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = max(0, threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def _op_histogram(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def build(onnx_path: Path, engine_path: Path, device, precision: str, threads: int = 0, **_extra) -> dict:
    """Let ONNX Runtime optimize the graph for the device's providers and save the result."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    level = build_level(device, precision)
    gpu = device.providers[0] != "CPUExecutionProvider"
    if gpu:  # else ONNX Runtime would optimize for the CPU it falls back to, without a word
        from kiln.backends.ort_cuda import load_cuda_libraries

        load_cuda_libraries()
    try:
        session = ort.InferenceSession(
            str(onnx_path),
            sess_options=_session_options(threads, optimized_path=engine_path, level=level),
            providers=list(device.providers),
        )
    except Exception as err:  # ONNX Runtime raises its own Fail/InvalidGraph types
        raise KilnError(f"ONNX Runtime could not load '{onnx_path}': {err}".replace("\n", " ")) from None
    if gpu and device.providers[0] not in session.get_providers():
        Path(engine_path).unlink(missing_ok=True)
        raise KilnError(f"ONNX Runtime loaded '{onnx_path}' without {device.providers[0]} (it fell back to "
                        f"{', '.join(session.get_providers())}): its CUDA or cuDNN libraries did not load; install "
                        f"onnxruntime-gpu's CUDA and cuDNN (or a CUDA build of torch) for this driver")
    before, after = _op_histogram(onnx_path), _op_histogram(engine_path)
    return {
        "builder": f"onnxruntime {ort.__version__}",
        "providers": list(device.providers),
        "graph_optimization_level": level,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "ops_in": before,
        "ops_out": after,
        # Casts ONNX Runtime inserted to run low-precision ops on fp32 kernels.
        "casts_added": after.get("Cast", 0) - before.get("Cast", 0),
    }


class OrtRunner(Runner):
    """An ONNX Runtime session behind the Runner protocol.

    For an engine (`build`'s saved model, already optimized) the graph is taken as it is. With
    `providers` and `optimize=True` it runs a plain ONNX file the way ONNX Runtime does by default
    (ORT_ENABLE_ALL): the `reference` stage's fp32 outputs.
    """

    def __init__(self, engine_path: Path, device=None, threads: int = 0, *, providers=None, optimize: bool = False):
        import onnxruntime as ort

        so = _session_options(threads)
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if not providers and device is None:
            raise ValueError("OrtRunner needs a device or providers")  # a programming error, not a user's
        providers = list(providers or device.providers)
        self.session = ort.InferenceSession(str(engine_path), sess_options=so, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outs))

    def max_batch(self) -> int | None:
        """The fixed batch of the first input, or None where the batch is dynamic."""
        dim = self.session.get_inputs()[0].shape[0]
        return dim if isinstance(dim, int) else None

    def describe(self) -> dict:
        return {"providers": self.session.get_providers()}

    def streams(self, n: int) -> list[Runner]:
        """This runner and n-1 more over the same InferenceSession, one thread each.

        ONNX Runtime's Run is thread-safe on one session: "Multiple threads can invoke the Run() method
        on the same inference session object" (ONNX Runtime, High Level Design, Key design decisions:
        https://onnxruntime.ai/docs/reference/high-level-design.html; microsoft/onnxruntime#19301). The
        session's weights and intra-op thread pool are shared; each run has its own intermediate tensors.
        """
        return [self] + [SessionStream(self) for _ in range(n - 1)]

    def memory_in_use(self) -> tuple[int, str] | None:
        return resident_bytes()

    def close(self) -> None:
        self.session = None


class SessionStream(Runner):
    """One more stream on an OrtRunner's session: the same session, run from its own thread."""

    def __init__(self, owner: OrtRunner):
        self.session = owner.session
        self.input_names, self.output_names = owner.input_names, owner.output_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(list(self.output_names), feeds)))

    def close(self) -> None:
        self.session = None  # the owner's session stays open


def resident_bytes() -> tuple[int, str] | None:
    """This process's resident memory (VmRSS of /proc/self/status; psutil where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024, "VmRSS of /proc/self/status"
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss, "psutil resident set size"


def load_runner(engine_path: Path, device, threads: int = 0) -> Runner:
    """The CPU provider's session, or on a GPU provider the device-timed runner (kiln.backends.ort_cuda)."""
    if device.providers[0] == "CPUExecutionProvider":
        return OrtRunner(engine_path, device, threads)
    reason = check_host(device)
    if reason:
        raise KilnError(f"cannot run '{engine_path}' here: {reason}")
    from kiln.backends.ort_cuda import OrtCudaRunner

    return OrtCudaRunner(engine_path, device, threads)


class OnnxRuntime(ModuleBackend):
    """ONNX Runtime: the "engine" is the session-optimized model; CPU provider, or CUDA with onnxruntime-gpu."""

    name = NAME
    label = "ONNX Runtime"






    def needs_gpu(self, device, rule: str) -> bool:
        """A GPU provider's jobs need its GPU (the optimized model is provider-specific); the CPU's none."""
        return device.providers[0] != "CPUExecutionProvider"

    def build_params(self, device, validation_batch_size: int) -> dict:
        return build_params(device, validation_batch_size)



    def findings(self, device, build: dict) -> list[str]:
        """Nodes ONNX Runtime placed on the CPU in a GPU provider's optimized graph (its Memcpy nodes)."""
        if device.providers[0] == "CPUExecutionProvider":
            return []
        from kiln.backends.ort_cuda import cpu_fallback

        found = cpu_fallback(build.get("ops_out"))
        return [found["finding"]] if found else []

    def serve_format(self, device) -> ServeFormat:
        """Triton's ONNX Runtime backend loads the optimized model; DeepStream builds from the ONNX variant."""
        return ServeFormat(triton_platform="onnxruntime_onnx", triton_file="model.onnx", engine_is_onnx=True)
