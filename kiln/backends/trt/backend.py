"""What the TensorRT and TensorRT-RTX backends answer alike: build settings, the op table, diagnosis, trtexec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.backends.base import ModuleBackend, ServeFormat
from kiln.backends.trt import builder
from kiln.backends.trt import ops as trt_ops


class TrtBackend(ModuleBackend):
    """A TensorRT flavor (``parser_flavor``: a key of kiln.backends.trt.ops' table)."""

    parser_flavor: str
    diagnoses = True

    def parser_version(self, device) -> str | tuple[int, int]:
        """The oldest version the device may run: an engine must parse on all of its range."""
        return device.tensorrt_min or trt_ops.OLDEST[self.parser_flavor]

    def build_params(self, device, validation_batch_size: int) -> dict[str, Any]:
        return builder.build_params(device, validation_batch_size)

    def model_problems(self, device, model) -> list[str]:
        return trt_ops.model_problems(self.parser_flavor, device.tensorrt_min, model.nms)

    def required_passes(self, device, opset: int) -> list[str]:
        return trt_ops.required_passes(self.parser_flavor, self.parser_version(device), opset)

    def latency_tool_name(self) -> str:
        from kiln.backends.trt import trtexec

        return trtexec.EXECUTABLES[self.parser_flavor]

    def latency_tool(self, runner, shapes: dict[str, list[int]], settings: dict) -> dict[str, Any] | None:
        """trtexec (tensorrt_rtx) on the runner's engine with Kiln's timing pinned; None when it is not on PATH."""
        from kiln.backends.trt import trtexec

        exe = trtexec.find(self.parser_flavor)
        if exe is None:
            return None
        # A CUDA graph the runner could not capture is not asked of trtexec either.
        used = trtexec.Settings(**{**settings, "cuda_graph": settings["cuda_graph"] and not runner.graph_note})
        return trtexec.run(exe, str(runner.engine_path), shapes, used, flavor=self.parser_flavor,
                           profile=runner.profile)

    def serve_format(self, device) -> ServeFormat:
        """A plan file: Triton's TensorRT backend and DeepStream's nvinfer load it as it is."""
        return ServeFormat(triton_platform="tensorrt_plan", triton_file="model.plan", nvinfer_engine=True)

    def diagnose(self, onnx_path: Path, device, precision: str, out: Path, spec=None) -> dict[str, Any]:
        from kiln.backends.trt import diagnose

        return diagnose.diagnose(onnx_path, device, precision, out, spec=spec)
