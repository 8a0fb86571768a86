"""Running an engine: :class:`TrtEngineRunner`, behind kiln.backends.base.Runner, plus what latency needs.

Engines run through the TensorRT (or TensorRT-RTX) runtime directly, with cuda-python
(``cuda.bindings.runtime``) for streams, memory, events and CUDA graphs: the latency measurement
needs the H2D copies, the engine's enqueue and the D2H copies as separate steps on one stream, and
CUDA graphs around the enqueue, which Polygraphy's TrtRunner does not expose. Polygraphy still
loads the engine (its logs carry TensorRT's reasons when deserializing fails).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.backends.base import Runner
from kiln.backends.cuda import CudaRuntime, _Buffer, capture_graph
from kiln.backends.trt.importer import LABELS, polygraphy_logs, polygraphy_trt
from kiln.backends.trt.io import (
    TRT_STORAGE,
    describe_io,
    from_storage,
    max_batch_of,
    select_profile,
    storage_nbytes,
    to_storage,
)
from kiln.errors import KilnError

log = logging.getLogger(__name__)


class TrtEngineRunner(Runner):
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

    device_timed = True  # CUDA events on its stream (kiln.validate, kiln.latency)

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

    # ---- concurrent streams

    def streams(self, n: int) -> list[Runner]:
        """This runner and n-1 more over the same engine, each its own execution context, CUDA stream,
        buffers and CUDA graph: trtexec's ``--infStreams=n`` (n contexts running concurrently)."""
        out: list[Runner] = [self]
        for _ in range(n - 1):
            other = type(self).__new__(type(self))
            other._setup(self.trt, self.engine, self.rt, self.flavor, self.cuda_graph != "off")
            other.engine_path = self.engine_path
            out.append(other)
        return out

    def context_memory(self) -> dict[str, Any]:
        """The engine's device memory per execution context (activations and scratch; TensorRT 10's
        ``ICudaEngine.device_memory_size_v2``, else ``device_memory_size`` of older releases)."""
        for name in ("device_memory_size_v2", "device_memory_size"):
            size = getattr(self.engine, name, None)
            if isinstance(size, int):
                return {"bytes": size, "method": f"ICudaEngine.{name}"}
        return {"bytes": None, "method": None}

    def memory_in_use(self) -> tuple[int, str] | None:
        free, total = self.rt("cudaMemGetInfo")
        return int(total) - int(free), "device memory in use (cudaMemGetInfo total - free)"

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
