"""The record written beside each variant (.json): what changed in the graph, dtypes, the kept Sigmoids."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from kiln.precision.graph import graph_inputs
from kiln.precision.options import QUANT_PRECISIONS, PrecisionOptions


def start_record(src: Path, dst: Path, options: PrecisionOptions) -> dict[str, Any]:
    """The record's first fields: what was asked for; the conversion adds what it did."""
    return {
        "precision": options.precision,
        "src": str(src),
        "dst": str(dst),
        "options": {
            "calib_method": options.calib_method,
            "op_types_to_exclude": list(options.op_types_to_exclude),
            "nodes_to_exclude": list(options.nodes_to_exclude),
            "keep_output_sigmoid": options.keep_output_sigmoid,
            "keep_io_types": options.keep_io_types,
        },
        "onnx_version": onnx.__version__,
    }


def _dtype_name(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t).lower()


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, after type inference (best effort)."""
    try:
        m = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  statistics only: fall back to the types the model already declares
        m = model
    types = {t.name: t.data_type for t in m.graph.initializer}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def summary(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, Any]:
    """Op-count changes, dtype histograms and what got quantized, as JSON-ready values."""
    ops_before = Counter(n.op_type for n in before.graph.node)
    ops_after = Counter(n.op_type for n in after.graph.node)
    delta = {k: ops_after[k] - ops_before[k] for k in set(ops_before) | set(ops_after)}
    types = _tensor_types(after)
    plumbing = ("Constant", "QuantizeLinear", "DequantizeLinear", "Cast")
    compute = [n for n in after.graph.node if n.op_type not in plumbing]
    node_dtypes = Counter(_dtype_name(types[n.output[0]]) for n in compute if n.output and n.output[0] in types)
    producer = {o: n for n in after.graph.node for o in n.output}
    quantized = Counter(
        n.op_type for n in compute if any(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)
    )
    q_types = Counter(
        _dtype_name(types[n.output[0]])
        for n in after.graph.node
        if n.op_type == "QuantizeLinear" and n.output[0] in types
    )
    return {
        "opset": next((o.version for o in after.opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": sum(ops_after.values()),
        "op_delta": {k: v for k, v in sorted(delta.items()) if v},
        "added": {k: max(0, delta.get(k, 0)) for k in ("QuantizeLinear", "DequantizeLinear", "Cast")},
        "initializers_by_dtype": dict(Counter(_dtype_name(t.data_type) for t in after.graph.initializer)),
        "tensors_by_dtype": dict(Counter(_dtype_name(t) for t in types.values())),
        "nodes_by_output_dtype": dict(node_dtypes),
        "quantized_ops": dict(quantized),
        "quantized_dtype": dict(q_types),
        "io": {v.name: _dtype_name(v.type.tensor_type.elem_type) for v in [*graph_inputs(after), *after.graph.output]},
    }


def sigmoid_report(variant: onnx.ModelProto, sigmoids: Sequence[str]) -> list[dict[str, Any]]:
    """For each kept output Sigmoid: does it still exist, is it fed by a DequantizeLinear, its dtype."""
    producer = {o: n for n in variant.graph.node for o in n.output}
    by_name = {n.name: n for n in variant.graph.node}
    types = _tensor_types(variant)
    report = []
    for s in sigmoids:
        n = by_name.get(s)
        if n is None:
            report.append({"name": s, "present": False})
            continue
        src = producer.get(n.input[0])
        report.append(
            {
                "name": s,
                "present": True,
                "fed_by_dequantize": bool(src is not None and src.op_type == "DequantizeLinear"),
                "input_dtype": _dtype_name(types.get(n.input[0], 0)),
            }
        )
    return report


def warn_about_result(record: dict[str, Any], options: PrecisionOptions, log: Callable[[str], Any]) -> None:
    """Log what in the record says the variant is not what was asked for (no Q/DQ, output Sigmoid not fp32)."""
    if options.precision in QUANT_PRECISIONS and not record["added"]["QuantizeLinear"] and not record["quantized_ops"]:
        log(
            f"WARNING: ModelOpt inserted no Q/DQ; this {options.precision} variant is the fp16 model. "
            "ModelOpt skips Convs with <16 channels (fp8: <=16 or kernels >32 taps) and small MatMuls."
        )
    for s in record.get("output_sigmoids", []):
        if not s.get("present"):
            log(f"WARNING: output Sigmoid {s['name']} is gone from the variant; cannot confirm it stayed fp32")
        elif s["fed_by_dequantize"] or s["input_dtype"] not in ("float", "undefined"):
            log(f"WARNING: output Sigmoid {s['name']} is not plain fp32 ({s}); check the exclusion")
