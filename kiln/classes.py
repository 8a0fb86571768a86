"""The class count an exported detector graph implies, read from the graph itself, and where Kiln records it.

Each layout carries its class count in a different place (docs/models.md, layouts):

* ``yolo``: ``output0`` (B, 4 + nc, A): nc is dimension 1 of the output's shape, less 4;
* ``rtdetr``: ``labels`` (B, K) come from RT-DETR's postprocessor as ``index % nc`` over the flattened
  (queries x classes) scores: nc is the constant divisor of that Mod;
* ``ultralytics_rtdetr``: the class index, the last column of ``output0`` (B, K, 6), is Ultralytics'
  ``index - floor(index / nc) * nc`` (RTDETRDecoder.postprocess): nc is the constant of that Mul.

Nothing is guessed: a symbolic dimension, or a class index made some other way, gives ``None`` and
the reason. The export stage (kiln.export) writes the count into the ONNX's metadata under
:data:`COUNT_KEY`, with how it was read under :data:`FROM_KEY`; the reference stage checks it against
the dataset's categories (kiln.accuracy.check_classes).
"""

from __future__ import annotations

from dataclasses import dataclass

COUNT_KEY = "num_classes"
FROM_KEY = "num_classes_from"

# Ops that carry a class index through unchanged (dtype or rank only), walked back from the output.
_PASS_THROUGH = ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten")


@dataclass(frozen=True)
class GraphClasses:
    """The class count a graph implies (None where it cannot be read) and how it was read, or why not."""

    count: int | None
    how: str


def graph_classes(model, layout: str) -> GraphClasses:
    """The class count of an exported graph (an ``onnx.ModelProto``) of ``layout``, read from the graph."""
    if layout == "yolo":
        return _yolo(model)
    if layout == "rtdetr":
        return _index_mod(model, "labels", "labels (B, K) = index mod nc")
    if layout == "ultralytics_rtdetr":
        return _index_mod(model, "output0", "output0 (B, K, 6) class column = index mod nc", last_column=True)
    return GraphClasses(None, f"layout {layout!r} has no known place for its class count")


def recorded(model) -> int | None:
    """The class count the export stage wrote into an ONNX's metadata (None: not recorded)."""
    meta = {p.key: p.value for p in model.metadata_props}
    value = meta.get(COUNT_KEY, "")
    return int(value) if value.isdigit() else None


def _output_dims(model, name: str) -> list:
    out = next((o for o in model.graph.output if o.name == name), None)
    return list(out.type.tensor_type.shape.dim) if out is not None else []


def _inferred(model):
    """``model`` with ONNX's shape inference (data propagation on) run afresh, or None where it fails.

    The TorchScript exporter leaves a dimension symbolic where it reshapes with a computed shape (a
    ``flatten`` under a dynamic batch), though the value is fixed; ONNX's inference, propagating the
    shape values, often reads it.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.ClearField("value_info")
    try:
        return onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception:  # a model over 2 GiB, an op inference does not know: not readable this way
        return None


def _yolo(model) -> GraphClasses:
    dims, how = _output_dims(model, "output0"), "output shape"
    if len(dims) != 3:
        return GraphClasses(None, f"output0 has rank {len(dims)}, not (B, 4 + nc, A)")
    if not dims[1].HasField("dim_value"):
        inferred = _inferred(model)
        again = _output_dims(inferred, "output0") if inferred is not None else []
        if len(again) == 3 and again[1].HasField("dim_value"):
            dims, how = again, "output shape (ONNX shape inference)"
    dim = dims[1]
    if not dim.HasField("dim_value"):
        name = dim.dim_param or "unnamed"
        return GraphClasses(None, f"output0 dim 1 (4 + nc) is symbolic ({name!r}) even after ONNX shape inference: "
                                  f"the class count cannot be read")
    if dim.dim_value < 5:
        return GraphClasses(None, f"output0 dim 1 is {dim.dim_value}, less than 4 box values + 1 class")
    return GraphClasses(dim.dim_value - 4, f"{how}: output0 dim 1 = 4 + nc = {dim.dim_value}")


def _index_mod(model, output: str, how: str, last_column: bool = False) -> GraphClasses:
    """nc of ``index % nc`` (a Mod, or ``a - q * nc`` with q = floor(a / nc)) that makes ``output``'s class index."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    name = output
    for _ in range(16):  # a few casts and reshapes at most
        node = producer.get(name)
        if node is None:
            break
        if node.op_type == "Concat" and last_column and name == output:
            name = node.input[-1]  # the class index is the layout's last column
        elif node.op_type in _PASS_THROUGH:
            name = node.input[0]
        elif node.op_type == "Mod":
            nc = _constant(graph, producer, node.input[1])
            if nc is not None and nc > 0:
                return GraphClasses(nc, f"graph: {how} = {nc}")
            break
        elif node.op_type == "Sub":
            nc = _remainder_divisor(graph, producer, node)
            if nc is not None and nc > 0:
                return GraphClasses(nc, f"graph: {how} = {nc}")
            break
        else:
            break
    return GraphClasses(None, f"{output}'s class index is not computed as index mod a constant nc: "
                              f"the class count cannot be read from the graph")


def _remainder_divisor(graph, producer: dict, sub) -> int | None:
    """C of ``a - q * C`` where q is computed from ``Div(a, C)`` (floor division written out), else None."""
    a, mul = sub.input[0], producer.get(sub.input[1])
    if mul is None or mul.op_type != "Mul":
        return None
    for q, c in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        nc = _constant(graph, producer, c)
        if nc is not None and _divides(graph, producer, q, a, nc):
            return nc
    return None


def _divides(graph, producer: dict, name: str, a: str, nc: int, depth: int = 6) -> bool:
    """Whether ``name`` is computed from ``Div(a, nc)`` within ``depth`` nodes (torch's floor division of ints)."""
    node = producer.get(name)
    if node is None or depth == 0:
        return False
    if node.op_type == "Div" and node.input[0] == a and _constant(graph, producer, node.input[1]) == nc:
        return True
    return any(_divides(graph, producer, i, a, nc, depth - 1) for i in node.input if i)


def _constant(graph, producer: dict, name: str) -> int | None:
    """The integer value of a scalar (or one-element) constant: an initializer or a Constant node's."""
    from onnx import numpy_helper

    tensor = next((t for t in graph.initializer if t.name == name), None)
    node = producer.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    if value.size != 1 or float(value.reshape(-1)[0]) != int(value.reshape(-1)[0]):
        return None
    return int(value.reshape(-1)[0])
