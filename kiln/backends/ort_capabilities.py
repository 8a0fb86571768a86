"""What ONNX Runtime can run on this host, per provider and precision: asked of the runtime, not tabled.

Each precision is probed on a tiny graph built like Kiln's variants of that precision
(:mod:`kiln.precision`): fp16/bf16 as AutoCast makes them (fp32 graph IO, Cast at the borders,
Conv, Sigmoid, Mul, MatMul, Softmax, Add in the low type; bf16 at opset 22, as AutoCast raises it),
int8/fp8 as ModelOpt's PTQ makes them (QuantizeLinear/DequantizeLinear pairs on the activations
and on the Conv and MatMul weights, opset 19). A precision *runs* when a session can be created
and its outputs are finite and close to the fp32 twin of the same graph. The probe also finds the
highest graph-optimization level that works (onnxruntime 1.31's EXTENDED Q/DQ fusions broke fp8
graphs with MatMul; 1.32 runs them at every level).

The answer is cached on disk per onnxruntime version and provider
(``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``), so a SLURM job that
re-reads the config does not probe again. A provider that this host does not have cannot be probed:
:data:`UNPROBED` is the table for that case, naming the versions it was checked with.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

from kiln.cache import cache_dir, write_atomic

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Highest first: the probe keeps the first level at which a precision runs.
LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC")
PROBE_FORMAT = 2  # bump when the probe graphs change, so cached answers are not reused
MIN_COSINE = 0.99  # a kernel that runs but computes garbage does not count as running

# Used only for a provider this host lacks (it cannot be asked). Checked with onnxruntime-gpu 1.31.1
# (CUDA 13, cuDNN 9) on an H200 with Kiln's demo variants: fp32, fp16 and int8 Q/DQ ran.
UNPROBED = {
    "CUDAExecutionProvider": {
        "precisions": ("fp32", "fp16", "int8"),
        "checked_with": "onnxruntime-gpu 1.31.1 on an H200 (cc 9.0); not probed on this host",
    },
}


@dataclass(frozen=True)
class Capability:
    """Whether a provider runs one precision's variants, at which optimization level, and why not."""

    precision: str
    runs: bool
    graph_optimization_level: str | None  # highest level that works; None when it does not run
    note: str


@functools.cache
def capabilities(provider: str = "CPUExecutionProvider") -> dict[str, Capability]:
    """Every precision's capability on `provider`: probed here (cached per version), or UNPROBED's table."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        known = UNPROBED.get(provider, {"precisions": ("fp32",), "checked_with": "not probed on this host"})
        return {p: Capability(p, p in known["precisions"], "ORT_ENABLE_EXTENDED" if p in known["precisions"] else None,
                              known["checked_with"]) for p in PRECISIONS}
    path = cache_dir() / f"ort-capabilities-{ort.__version__}-{provider}-v{PROBE_FORMAT}.json"
    try:
        cached = json.loads(path.read_text())
        return {p: Capability(**cached[p]) for p in PRECISIONS}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = {p: probe(p, provider) for p in PRECISIONS}
    write_atomic(path, json.dumps({p: asdict(c) for p, c in found.items()}, indent=1))  # read-only: probe next time
    return found


def runnable(provider: str = "CPUExecutionProvider") -> tuple[str, ...]:
    """The precisions `provider` runs, in Kiln's order."""
    return tuple(p for p, c in capabilities(provider).items() if c.runs)


def probe(precision: str, provider: str = "CPUExecutionProvider") -> Capability:
    """Run the probe graph of `precision` on `provider` at each optimization level, highest first."""
    import numpy as np
    import onnxruntime as ort

    model, reference = _probe_graph(precision), _probe_graph("fp32")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 8, 8)).astype(np.float32)
    want = _run(ort, reference, x, provider, "ORT_ENABLE_ALL")
    errors = []
    for level in LEVELS:
        try:
            got = _run(ort, model, x, provider, level)
        except Exception as err:  # ORT's own Fail / NotImplemented / InvalidGraph types
            errors.append(f"{level}: {str(err).splitlines()[0][:160]}")
            continue
        cos = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-30))
        if not np.isfinite(got).all() or cos < MIN_COSINE:
            errors.append(f"{level}: runs, but its output is off (cosine {cos:.4f} to fp32)")
            continue
        return Capability(precision, True, level, f"probed on onnxruntime {ort.__version__}: runs at {level}")
    reasons = {e.partition(": ")[2] for e in errors}
    why = f"{reasons.pop()} (at every optimization level)" if len(reasons) == 1 else "; ".join(errors)
    return Capability(precision, False, None, f"probed on onnxruntime {ort.__version__}: {why}")


def _run(ort, model_bytes: bytes, x, provider: str, level: str):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, sess_options=so, providers=[provider])
    return session.run(None, {"x": x})[0]


def _probe_graph(precision: str) -> bytes:
    """The probe model of `precision` (serialized): x (1,4,8,8) fp32 -> y (1,4,64) fp32."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    conv_w = rng.uniform(-0.3, 0.3, (4, 4, 3, 3)).astype(np.float32)
    mm_w = rng.uniform(-0.2, 0.2, (64, 64)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape")]
    opset = {"fp32": 17, "fp16": 17, "bf16": 22, "int8": 19, "fp8": 19}[precision]

    if precision in ("int8", "fp8"):
        qtype = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
        qmax = 127.0 if precision == "int8" else 448.0

        def qdq(name: str, scale: float) -> str:
            inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"))
            inits.append(helper.make_tensor(f"{name}_z", qtype, [], [0]))
            nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
            return f"{name}_dq"

        def weight(name: str, w: np.ndarray) -> str:
            scale = float(np.abs(w).max() / qmax)
            vals = np.round(w / scale).astype(np.int8).ravel().tolist() if precision == "int8" else (w / scale).ravel().tolist()
            inits.extend([helper.make_tensor(f"{name}_q", qtype, w.shape, vals),
                          numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                          helper.make_tensor(f"{name}_z", qtype, [], [0])])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
            return f"{name}_dq"

        x = qdq("x", 1.0 / qmax)
        nodes.append(helper.make_node("Conv", [x, weight("conv_w", conv_w)], ["c"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Sigmoid", ["c"], ["s"]))
        nodes.append(helper.make_node("Mul", ["c", "s"], ["m"]))
        nodes.append(helper.make_node("Reshape", ["m", "shape"], ["r"]))
        nodes.append(helper.make_node("MatMul", [qdq("r", 4.0 / qmax), weight("mm_w", mm_w)], ["mm"]))
        nodes.append(helper.make_node("Softmax", ["mm"], ["y"], axis=-1))
    else:
        dtype = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
        inits += [numpy_helper.from_array(conv_w, "conv_w32"), numpy_helper.from_array(mm_w, "mm_w32")]
        for name in ("conv_w", "mm_w"):
            nodes.append(helper.make_node("Cast", [f"{name}32"], [name], to=dtype))
        nodes.append(helper.make_node("Cast", ["x"], ["xl"], to=dtype))
        nodes.append(helper.make_node("Conv", ["xl", "conv_w"], ["c"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Sigmoid", ["c"], ["s"]))
        nodes.append(helper.make_node("Mul", ["c", "s"], ["m"]))
        nodes.append(helper.make_node("Reshape", ["m", "shape"], ["r"]))
        nodes.append(helper.make_node("MatMul", ["r", "mm_w"], ["mm"]))
        nodes.append(helper.make_node("Softmax", ["mm"], ["sm"], axis=-1))
        nodes.append(helper.make_node("Add", ["sm", "sm"], ["a"]))
        nodes.append(helper.make_node("Cast", ["a"], ["y2"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Mul", ["y2", "half"], ["y"]))
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    graph = helper.make_graph(
        nodes, f"kiln_probe_{precision}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9).SerializeToString()
