"""ONNX Runtime's CUDA provider as a device runner: device-resident I/O, timed with CUDA events.

The session runs on a CUDA stream Kiln creates (the provider's ``user_compute_stream``), with every
input and output bound to device memory Kiln allocated (I/O binding), so that a query is, on that
one stream: H2D copies of the inputs from pinned host memory, ``mark("h2d")``, the session's GPU
work, ``mark("compute")``, D2H copies of the outputs, ``mark("d2h")`` -- the phases and timer of the
TensorRT runners (kiln.latency.CudaEventTimer), so GPU compute is timed apart from the copies.
Run options ask ONNX Runtime not to synchronize the stream after each run, so queries overlap as
they do under trtexec. CUDA graphs are not used (ONNX Runtime's need a session built for them, with
fixed addresses and one shape); ``describe()`` says so.

Where ONNX Runtime placed nodes on the CPU (it inserts MemcpyToHost/MemcpyFromHost around them),
the optimized model that the build wrote holds those Memcpy nodes: :func:`cpu_fallback` counts them,
and validation records it as a finding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.backends.base import Runner
from kiln.errors import KilnError

MEMCPY_OPS = ("MemcpyToHost", "MemcpyFromHost")


def load_cuda_libraries() -> str:
    """Load the CUDA runtime, cuBLAS and cuDNN that onnxruntime-gpu links against, before its first session.

    ONNX Runtime's documented ways ("Compatibility with PyTorch" on its CUDA provider page, and
    ``onnxruntime.preload_dlls``): where a CUDA build of PyTorch is installed, ``import torch`` before the
    session loads the same major CUDA and cuDNN; otherwise ``preload_dlls()`` loads them from the NVIDIA
    pip packages beside onnxruntime. Without either the provider fails to load and ONNX Runtime silently
    runs the session on the CPU, which the callers refuse. Returns how the libraries were loaded.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.version.cuda:
            return f"import torch ({torch.__version__}, CUDA {torch.version.cuda})"
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
        return "onnxruntime.preload_dlls()"
    return "default library paths"


def cpu_fallback(ops_out: dict[str, int] | None) -> dict[str, Any] | None:
    """The finding where an optimized graph for a GPU provider copies to and from the host (nodes on the CPU)."""
    n = sum((ops_out or {}).get(op, 0) for op in MEMCPY_OPS)
    if not n:
        return None
    return {"memcpy_nodes": n, "finding": f"ONNX Runtime placed nodes on the CPU provider: it inserted {n} Memcpy "
                                          f"nodes between them and the GPU, which copy tensors across PCIe on every "
                                          f"query (see the engine's ops_out for the op types)"}


class OrtCudaRunner(Runner):
    """An ONNX Runtime session on the CUDA provider, on Kiln's stream, with device-resident I/O."""

    device_timed = True
    cuda_graph = "off"
    graph_note = "ONNX Runtime CUDA graphs are not used by Kiln (they need a session built for one fixed shape)"

    def __init__(self, engine_path: Path, device, threads: int = 0):
        self.cuda_libraries = load_cuda_libraries()
        import onnxruntime as ort

        from kiln.backends.cuda import CudaRuntime

        self.rt = CudaRuntime()
        self.cudart = self.rt.rt
        self.stream = self.rt("cudaStreamCreate")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the engine is optimized
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        options = {"device_id": "0", "user_compute_stream": str(int(self.stream))}
        try:
            self.session = ort.InferenceSession(str(engine_path), sess_options=so,
                                                providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
        except Exception as err:  # ORT's own error types
            raise KilnError(f"ONNX Runtime could not load '{engine_path}' on the CUDA provider: {err}"
                            .replace("\n", " ")) from None
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise KilnError(f"ONNX Runtime loaded '{engine_path}' without its CUDA provider (it has "
                            f"{', '.join(self.session.get_providers())}): install onnxruntime-gpu for this CUDA")
        self.engine_path = Path(engine_path)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._buffers: dict[str, Any] = {}
        self._binding = None
        self._shapes: dict[str, tuple] = {}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch through the bound device buffers, waited for; host arrays out."""
        self._bind(feeds)
        self._h2d()
        self.session.run_with_iobinding(self._binding, self.run_options)
        self._d2h()
        self.rt("cudaStreamSynchronize", self.stream)
        return {name: self._host(name).copy() for name in self.output_names}

    def query(self, feeds: dict[str, np.ndarray], mark: Callable[[str], None] = lambda name: None) -> Callable[[], None]:
        self.infer(feeds)  # binds these shapes, stages the inputs, checks it runs

        def step() -> None:
            self._h2d()
            mark("h2d")
            self.session.run_with_iobinding(self._binding, self.run_options)
            mark("compute")
            self._d2h()
            mark("d2h")

        return step

    def max_batch(self) -> int | None:
        dim = self.session.get_inputs()[0].shape[0]
        return dim if isinstance(dim, int) else None

    def streams(self, n: int) -> list[Runner]:
        """This runner and n-1 more on the same session, each with its own I/O binding and device buffers.

        ONNX Runtime's Run is thread-safe on one session ("Multiple threads can invoke the Run() method on
        the same inference session object": https://onnxruntime.ai/docs/reference/high-level-design.html).
        The CUDA provider runs a session's kernels on its one compute stream (``user_compute_stream``), so
        the streams' copies and kernels queue on that CUDA stream: they share the weights, not the stream.
        """
        return [self] + [_SessionStream(self) for _ in range(n - 1)]

    def memory_in_use(self) -> tuple[int, str] | None:
        free, total = self.rt("cudaMemGetInfo")
        return int(total) - int(free), "device memory in use (cudaMemGetInfo total - free)"

    def describe(self) -> dict[str, Any]:
        return {"runner": "ONNX Runtime CUDAExecutionProvider, I/O bound to device memory, on a cuda.bindings stream",
                "providers": self.session.get_providers(), "cuda_graph": f"off ({self.graph_note})",
                "cuda_libraries": self.cuda_libraries}

    def close(self) -> None:
        if self._release():
            with contextlib.suppress(Exception):
                self.cudart.cudaStreamDestroy(self.stream)

    def _release(self) -> bool:
        """Wait for the stream, free this runner's buffers and drop the session; False when already closed."""
        if getattr(self, "rt", None) is None:
            return False
        with contextlib.suppress(Exception):
            self.rt("cudaStreamSynchronize", self.stream)
        self._free()
        self.session = None
        self.rt = None
        return True

    def _free(self) -> None:
        for buf, _, _ in self._buffers.values():
            buf.free()
        self._buffers = {}
        self._binding = None

    # ------------------------------------------------------------------ buffers

    def _bind(self, feeds: dict[str, np.ndarray]) -> None:
        from kiln.backends.cuda import _Buffer

        shapes = {n: tuple(np.shape(feeds[n])) for n in self.input_names}
        if shapes != {n: self._shapes.get(n) for n in self.input_names}:
            # Output shapes for these inputs: one plain run (host I/O) tells them.
            outs = self.session.run(list(self.output_names), {n: feeds[n] for n in self.input_names})
            for buf, _, _ in self._buffers.values():
                buf.free()
            self._buffers = {}
            binding = self.session.io_binding()
            for name, arr in [*((n, np.ascontiguousarray(feeds[n])) for n in self.input_names),
                              *zip(self.output_names, outs)]:
                buf = _Buffer(self.rt, arr.nbytes)
                self._buffers[name] = (buf, arr.dtype, arr.shape)
                bind = binding.bind_input if name in self.input_names else binding.bind_output
                bind(name, "cuda", 0, arr.dtype, list(arr.shape), int(buf.device))
            self._binding = binding
            self._shapes = {**shapes, **{n: o.shape for n, o in zip(self.output_names, outs)}}
        for name in self.input_names:
            buf, dtype, shape = self._buffers[name]
            arr = np.ascontiguousarray(feeds[name], dtype=dtype)
            buf.host_bytes(arr.nbytes)[:] = arr.reshape(-1).view(np.uint8)

    def _copy(self, names, kind: str) -> None:
        direction = getattr(self.cudart.cudaMemcpyKind, kind)
        for name in names:
            buf, dtype, shape = self._buffers[name]
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            src, dst = (buf.host, buf.device) if kind == "cudaMemcpyHostToDevice" else (buf.device, buf.host)
            self.rt("cudaMemcpyAsync", dst, src, n, direction, self.stream)

    def _h2d(self) -> None:
        self._copy(self.input_names, "cudaMemcpyHostToDevice")

    def _d2h(self) -> None:
        self._copy(self.output_names, "cudaMemcpyDeviceToHost")

    def _host(self, name: str) -> np.ndarray:
        buf, dtype, shape = self._buffers[name]
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return buf.host_bytes(n).view(dtype).reshape(shape)


class _SessionStream(OrtCudaRunner):
    """One more stream on an OrtCudaRunner's session: its own I/O binding and buffers, the session's stream."""

    def __init__(self, owner: OrtCudaRunner):
        self.rt, self.cudart, self.stream = owner.rt, owner.cudart, owner.stream
        self.session, self.engine_path = owner.session, owner.engine_path
        self.input_names, self.output_names = owner.input_names, owner.output_names
        self.run_options = owner.run_options
        self._buffers, self._binding, self._shapes = {}, None, {}

    def close(self) -> None:
        """Free this stream's buffers; the session and its CUDA stream stay the owner's."""
        self._release()
