"""The CUDA runtime through cuda-python: checked calls, CUDA graph capture, device and pinned buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.errors import KilnError


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
