"""The backend contract: every question the workflow, the config check and the stages ask of a backend.

A backend is a subclass of :class:`Backend` registered under its name (kiln.backends). Nothing outside
``kiln/backends/`` knows a backend's name or compares it: the config check, the host plan
(kiln.workflow), build, validate, baseline, diagnose, surgery and the summary ask these methods. A
method without a default is abstract, so a backend that lacks one fails when it is instantiated,
naming what is missing.

Its engines run through a :class:`Runner`: activated when constructed, then ``infer`` (and, for
runners timed on the device, ``query``), then ``close``. ``streams(n)`` gives runners over the same
engine for N concurrent streams, ``context_memory``/``memory_in_use`` what each more one costs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class Runner(ABC):
    """A loaded engine: named inputs in, named outputs out.

    Runners timed by the host (ONNX Runtime on the CPU) implement ``infer`` alone. Runners timed on the
    device set ``device_timed`` and implement ``query``: validation then times them with CUDA events on
    ``stream`` through ``cudart`` (kiln.latency), at every batch size of ``profile``.
    """

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    device_timed: ClassVar[bool] = False
    # Device timing (device_timed runners): CUDA stream and runtime bindings the events are recorded on,
    # the optimization profile in use, why CUDA graphs are off (None: not off), and the engine file (for
    # the backend's own latency tool).
    stream: Any = None
    cudart: Any = None
    profile: int = 0
    graph_note: str | None = None
    cuda_graph: str = "off"
    engine_path: Path | None = None

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch synchronously and return host arrays."""

    def query(self, feeds: dict[str, np.ndarray], mark: Callable[[str], None]) -> Callable[[], Any]:
        """A step that runs one query of ``feeds`` on the device, calling ``mark(phase)`` between phases."""
        raise NotImplementedError(f"{type(self).__name__} is timed by the host: it has no device query")

    def max_batch(self) -> int | None:
        """The largest batch the engine accepts (None: no limit it knows of)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What validation.json records about the runner (providers, profile, CUDA graphs)."""
        return {}

    # ---- concurrent streams (kiln.streams, validation's "streams")

    def streams(self, n: int) -> list[Runner]:
        """`n` runners over this one's engine that may run concurrently, one per stream; the first is self.

        TensorRT: an execution context and a CUDA stream each (trtexec's --infStreams). ONNX Runtime:
        the one session, shared (its Run is thread-safe). Close the others when done; closing them
        leaves this runner and its engine open. By default a runner is one stream only: it does not
        say that its engine may run concurrently.
        """
        if n == 1:
            return [self]
        raise NotImplementedError(f"{type(self).__name__} does not run concurrent streams (Runner.streams)")

    def context_memory(self) -> dict[str, Any]:
        """Memory one more stream takes, where the engine tells it: {"bytes": int | None, "method": str}.

        TensorRT answers with the engine's device memory per execution context. Where the engine does not
        tell it (None), validation measures it with ``memory_in_use`` around the extra streams' first run.
        """
        return {"bytes": None, "method": None}

    def memory_in_use(self) -> tuple[int, str] | None:
        """A reading of the memory the runner's process or device holds now, and what was read; None: unknown."""
        return None

    def close(self) -> None:
        """Release the engine, its contexts and device memory (nothing to release by default)."""
        return None


@dataclass(frozen=True)
class ServeFormat:
    """How a backend's engine file is served (stage serve, kiln/serve/).

    ``triton_platform``: the platform of Triton's native backend that loads the engine file
    (``tensorrt_plan``, ``onnxruntime_onnx``), None where Triton has none; ``triton_file``: its
    name in the model's version folder. ``engine_is_onnx``: the engine file is an ONNX graph
    (its inputs and outputs are read from it; else from the ONNX it was built from).
    ``nvinfer_engine``: DeepStream's nvinfer loads the engine file itself (``model-engine-file``);
    else it builds its own engine from the ONNX (``onnx-file``).
    """

    triton_platform: str | None = None
    triton_file: str = "model.engine"
    engine_is_onnx: bool = False
    nvinfer_engine: bool = False


class Backend(ABC):
    """One runtime that builds and runs engines for devices (``devices.<name>.backend``)."""

    name: ClassVar[str]  # the registry key, as configs name it
    label: ClassVar[str]  # for messages: "ONNX Runtime", "TensorRT"
    # Whether a failed build is reduced to its smallest failing subgraph (stage diagnose).
    diagnoses: ClassVar[bool] = False

    # ------------------------------------------------------------------ availability

    @abstractmethod
    def is_available(self) -> bool:
        """The backend's Python package imports on this host."""

    @abstractmethod
    def version(self) -> str | None:
        """Its version here, or None when it is not installed."""

    # ------------------------------------------------------------------ config time

    @abstractmethod
    def check_device(self, device) -> list[str]:
        """Config-time problems of a device on this backend (precision, opset, keys), each with its fix."""

    def source_precision(self, precision: str, device) -> str:
        """The precision-variant ONNX an engine of ``precision`` is built from."""
        return precision

    def needs_calibration(self, device, precision: str) -> bool:
        """Whether building this precision calibrates on the calibration inputs (an INT8 calibrator)."""
        return False

    def strongly_typed(self, device) -> bool:
        """Whether every tensor type comes from the ONNX (True) or from builder flags (False)."""
        return True

    def constrains_layers(self, device) -> bool:
        """Whether a mixed variant (int8-mixed) can be built from its strict source ONNX, its kept nodes held
        to their precision layer by layer (build's ``kept_nodes``), where source_precision is not its Q/DQ one."""
        return False

    def model_problems(self, device, model) -> list[str]:
        """Config-time problems of building `model` (a ModelSpec) for `device`: ops its parser cannot take."""
        return []

    def required_passes(self, device, opset: int) -> list[str]:
        """Surgery passes (kiln.surgery) the device's parser needs on a graph of `opset`."""
        return []

    # ------------------------------------------------------------------ this host

    @abstractmethod
    def check_host(self, device) -> str | None:
        """Why this host cannot run the device's engines (validate), or None when it can."""

    @abstractmethod
    def check_build_host(self, device) -> str | None:
        """Why this host cannot build the device's engines, or None when it can."""

    def builds_on_device(self, device) -> bool:
        """Whether its engines must be built on the device itself (False: ahead of time on any host)."""
        return True

    def needs_gpu(self, device, rule: str) -> bool:
        """Whether a job of ``rule`` (build, validate, baseline, diagnose) for ``device`` needs a GPU."""
        return True

    def baseline_torch_device(self, device) -> str:
        """Where the PyTorch eager baseline of this device runs: "cuda" on a GPU device, else "cpu"."""
        return "cuda" if self.needs_gpu(device, "validate") else "cpu"

    # ------------------------------------------------------------------ build and run

    def build_params(self, device, validation_batch_size: int) -> dict[str, Any]:
        """Device settings that change an engine (tracked by Snakemake)."""
        return {}

    @abstractmethod
    def build(self, onnx_path: Path, engine_path: Path, device, precision: str, threads: int = 0,
              **extra: Any) -> dict[str, Any]:
        """Build the engine of ``precision`` from ``onnx_path`` into ``engine_path``; returns its metadata."""

    @abstractmethod
    def load_runner(self, engine_path: Path, device, threads: int = 0) -> Runner:
        """The engine at ``engine_path``, loaded for inference."""

    def findings(self, device, build: dict[str, Any]) -> list[str]:
        """What the build record says that the summary should flag (nodes a GPU provider left on the CPU)."""
        return []

    def diagnose(self, onnx_path: Path, device, precision: str, out: Path, spec=None) -> dict[str, Any]:
        """Reduce a model this backend refuses to its smallest failing subgraph; write `out` (when ``diagnoses``)."""
        raise NotImplementedError(f"backend '{self.name}' does not diagnose failed builds")

    def latency_tool(self, runner: Runner, shapes: dict[str, list[int]], settings: Any) -> dict[str, Any] | None:
        """The backend's own latency tool on the same engine and shapes (trtexec), or None when it has none."""
        return None

    def latency_tool_name(self) -> str | None:
        """The name of that tool (for "not on PATH" notes), or None."""
        return None

    # ------------------------------------------------------------------ serving

    def serve_format(self, device) -> ServeFormat:
        """How Triton and DeepStream take this backend's engines (default: neither loads the file itself)."""
        return ServeFormat()


class ModuleBackend(Backend):
    """A backend whose availability, checks, build and runner are the functions of the same names in the
    module that defines it (kiln/backends/onnxruntime.py, tensorrt.py, tensorrt_rtx.py), looked up at
    each call: the module stays the implementation (and what tests patch), the class is the contract."""

    def _fn(self, name: str):
        import sys

        return getattr(sys.modules[type(self).__module__], name)

    def is_available(self) -> bool:
        return self._fn("is_available")()

    def version(self) -> str | None:
        return self._fn("version")()

    def check_device(self, device) -> list[str]:
        return self._fn("check_device")(device)

    def check_host(self, device) -> str | None:
        return self._fn("check_host")(device)

    def check_build_host(self, device) -> str | None:
        return self._fn("check_build_host")(device)

    def build(self, onnx_path: Path, engine_path: Path, device, precision: str, threads: int = 0,
              **extra: Any) -> dict[str, Any]:
        return self._fn("build")(onnx_path, engine_path, device, precision, threads, **extra)

    def load_runner(self, engine_path: Path, device, threads: int = 0) -> Runner:
        return self._fn("load_runner")(engine_path, device, threads)
