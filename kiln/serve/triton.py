"""A Triton model repository for a device's engines: the native backend's model and an end-to-end detector.

Per engine, two models (README: Deploying):

* ``{model}_{precision}``: the engine on Triton's own backend for it (the backend's ``serve_format``:
  ``tensorrt_plan`` with ``1/model.plan``, ``onnxruntime_onnx`` with ``1/model.onnx``). Its
  ``max_batch_size`` is the engine's largest profile batch (TensorRT) or the device's largest batch size
  where the ONNX batch is dynamic, 0 where the batch is fixed (then the dims carry it); names, dtypes and
  dims are the engine's own; ``dynamic_batching`` prefers the device's batch sizes; ``instance_group``
  counts the best stream count validation found (1 until validation records one).
* ``{model}_{precision}_detector``: images in, detections out, on Triton's Python backend. Its model.py
  runs ``kiln.runtime.Detector`` on a copy of the engine folder, so pre- and post-processing ship with it.

Every model folder has a ``labels.txt`` (class names, one a line, by 0-based class id).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# ONNX TensorProto element types -> Triton's data types (model_config.proto DataType).
TRITON_DTYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
DETECTOR_SUFFIX = "_detector"
LABELS = "labels.txt"


@dataclass(frozen=True)
class Tensor:
    """One engine input or output: its name, Triton data type and full shape (-1 where it varies)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _dims(value_info) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)


def _dtype(value_info, where: str) -> str:
    from kiln.errors import KilnError

    elem = value_info.type.tensor_type.elem_type
    if elem not in TRITON_DTYPES:
        raise KilnError(f"{where}: tensor '{value_info.name}' has ONNX element type {elem}, which Triton has no "
                        f"data type for: change the model's output type")
    return TRITON_DTYPES[elem]


def graph_io(onnx_path: str | Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX graph (initializers listed as inputs left out)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = [Tensor(v.name, _dtype(v, str(onnx_path)), _dims(v)) for v in graph.input if v.name not in weights]
    outputs = [Tensor(v.name, _dtype(v, str(onnx_path)), _dims(v)) for v in graph.output]
    return inputs, outputs


def profile_shapes(inputs: list[Tensor], profiles: list[dict]) -> list[Tensor]:
    """Inputs with the shapes the engine's optimization profiles allow: a dim fixed where every profile fixes it
    to one value, else -1."""
    out = []
    for t in inputs:
        ranges = [p[t.name] for p in profiles if t.name in p]
        if not ranges:
            out.append(t)
            continue
        dims = []
        for i in range(len(ranges[0]["min"])):
            seen = {r["min"][i] for r in ranges} | {r["max"][i] for r in ranges}
            dims.append(seen.pop() if len(seen) == 1 else -1)
        out.append(Tensor(t.name, t.dtype, tuple(dims)))
    return out


def max_batch_size(record: dict, inputs: list[Tensor], batch_sizes: tuple[int, ...]) -> int:
    """Triton's max_batch_size for an engine: 0 when its batch is fixed.

    With optimization profiles (engine.json ``profiles``, TensorRT) the largest batch they allow, where the
    batch varies within them; without (ONNX Runtime) the device's largest batch size where the graph's
    batch dim is dynamic.
    """
    profiles = record.get("profiles") or []
    first = inputs[0].name
    ranges = [p[first] for p in profiles if first in p]
    if ranges:
        if all(r["min"][0] == r["max"][0] for r in ranges) and len({r["max"][0] for r in ranges}) == 1:
            return 0
        return max(int(r["max"][0]) for r in ranges)
    return max(batch_sizes) if inputs[0].shape and inputs[0].shape[0] == -1 else 0


def _io_block(key: str, tensors: list[Tensor], batched: bool, labels: dict[str, str] | None = None) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        dims = t.shape[1:] if batched else t.shape
        label = f' label_filename: "{labels[t.name]}"' if labels and t.name in labels else ""
        comma = "," if i < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{t.name}" data_type: {t.dtype} dims: [ {", ".join(map(str, dims))} ]{label} }}'
                     f"{comma}")
    lines.append("]")
    return lines


def config_text(name: str, *, platform: str | None = None, backend: str | None = None, max_batch: int,
                inputs: list[Tensor], outputs: list[Tensor], preferred: list[int], instances: int, kind: str,
                labels: dict[str, str] | None = None, comment: str = "") -> str:
    """A config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    lines = [f"# {comment}"] if comment else []
    lines.append(f'name: "{name}"')
    if platform:
        lines.append(f'platform: "{platform}"')
    if backend:
        lines.append(f'backend: "{backend}"')
    lines.append(f"max_batch_size: {max_batch}")
    lines += _io_block("input", inputs, max_batch > 0)
    lines += _io_block("output", outputs, max_batch > 0, labels)
    if max_batch > 0:
        sizes = [b for b in preferred if 1 < b <= max_batch] or [max_batch]
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, sizes))} ] }}")
    lines.append(f"instance_group [ {{ count: {instances} kind: {kind} }} ]")
    return "\n".join(lines) + "\n"


def best_streams(validation: str | Path | None) -> int:
    """The stream count validation found best (validation.json ``streams.best``), else 1."""
    if validation is None or not Path(validation).is_file():
        return 1
    streams = json.loads(Path(validation).read_text()).get("streams")
    best = streams.get("best") if isinstance(streams, dict) else None
    return int(best) if isinstance(best, int) and best > 0 else 1


def place(src: str | Path, dst: Path) -> None:
    """Put a copy of `src` at `dst`: a hard link where the filesystem allows (engines are large), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# The detector's tensors (an HTTP/gRPC client sends one HxWx3 uint8 image per request).
DETECTOR_INPUTS = [Tensor("IMAGES", "TYPE_UINT8", (-1, -1, 3))]
DETECTOR_OUTPUTS = [Tensor("BOXES", "TYPE_FP32", (-1, 4)), Tensor("SCORES", "TYPE_FP32", (-1,)),
                    Tensor("CLASSES", "TYPE_INT32", (-1,))]

# The Python backend's model.py. Its stub runs its own embedded Python: kiln is found through the path in
# kiln.json (the checkout that wrote this repository) or KILN_ROOT, unless it is installed there.
MODEL_PY = '''"""Kiln's end-to-end detector on Triton's Python backend: one HxWx3 uint8 image in, its detections out.

Written by Kiln's serve stage (kiln/serve/triton.py). It runs kiln.runtime.Detector on the engine folder
beside it (engine/: engine.json, the engine file and model.json), so preprocessing, decode and NMS are
the code validation measured. Outputs: BOXES (N, 4) xyxy in the image's pixels, SCORES (N,), CLASSES (N,)
0-based class ids (labels.txt names them).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
SETTINGS = json.loads((HERE / "kiln.json").read_text())


def _kiln_on_path():
    root = os.environ.get("KILN_ROOT") or SETTINGS["kiln_root"]
    if root and root not in sys.path:
        sys.path.insert(0, root)


def _quiet_dlpack_capsules(unraisable, _default=sys.unraisablehook):
    # The stub renames a consumed capsule "used_dlpack", numpy 2 expects "used_dltensor": numpy's
    # destructor then reports a harmless ValueError per output tensor.
    if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
        return
    _default(unraisable)


def _to_numpy(tensor):
    # DLPack, not Tensor.as_numpy(): the stub's pybind11 predates numpy 2, whose as_numpy() data is wrong.
    return np.from_dlpack(tensor)


def _to_triton(name, array):
    # Likewise pb_utils.Tensor(name, array) sends no data under numpy 2.
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


class TritonPythonModel:
    def initialize(self, args):
        sys.unraisablehook = _quiet_dlpack_capsules
        _kiln_on_path()
        from kiln.runtime import Detector

        self.detector = Detector.load(HERE / "engine")

    def execute(self, requests):
        responses = []
        for request in requests:
            image = _to_numpy(pb_utils.get_input_tensor_by_name(request, "IMAGES"))
            try:
                det = self.detector.predict([np.ascontiguousarray(image, dtype=np.uint8)])[0]
            except Exception as err:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                _to_triton("BOXES", np.asarray(det.boxes, dtype=np.float32).reshape(-1, 4)),
                _to_triton("SCORES", np.asarray(det.scores, dtype=np.float32).reshape(-1)),
                _to_triton("CLASSES", np.asarray(det.class_ids, dtype=np.int32).reshape(-1)),
            ]))
        return responses

    def finalize(self):
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()
'''
