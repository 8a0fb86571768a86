"""Graph queries: the output Sigmoids and score tail kept in fp32, node names and patterns, graph inputs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

# Ops that only move or reshape data. Walking back from a graph output through these reaches the
# Sigmoid that produced the scores (e.g. YOLO's Concat(boxes, cls.sigmoid()) -> Transpose -> output).
# Value: which inputs carry the data (None = all), so we do not wander into index/shape inputs.
_DATA_MOVEMENT_OPS: dict[str, tuple[int, ...] | None] = {
    "Concat": None,
    "Reshape": (0,),
    "Transpose": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "GatherND": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Flatten": (0,),
    "Identity": (0,),
    "Split": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Cast": (0,),
}
# Cheap score post-processing that follows the output Sigmoid (top-k query selection in DETR-style
# heads, per-anchor max score). ModelOpt quantizes TopK inputs by default in int8 mode, which would
# round the scores to 256 levels before ranking them; these stay with the Sigmoid in fp32.
_SCORE_TAIL_OPS = frozenset(_DATA_MOVEMENT_OPS) | {"TopK", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin"}


def find_output_sigmoids(model: onnx.ModelProto) -> list[str]:
    """Names of the Sigmoid nodes that feed graph outputs through data-movement ops only.

    From each graph output we walk back through Concat/Reshape/Transpose/Slice/Gather/... (data
    inputs only) and stop at the first Sigmoid on each path; any other op ends the path. Backbone
    Sigmoids (SiLU) are never reached because a Mul or Conv lies between them and the outputs.
    """
    producer = {o: n for n in model.graph.node for o in n.output if o}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Sigmoid":
            found.append(node.name)
        elif node.op_type in _DATA_MOVEMENT_OPS:
            idx = _DATA_MOVEMENT_OPS[node.op_type]
            inputs = node.input if idx is None else [node.input[i] for i in idx if i < len(node.input)]
            stack.extend(i for i in inputs if i)
    return sorted(found)


def find_score_tail(model: onnx.ModelProto, sigmoids: Sequence[str]) -> list[str]:
    """Nodes downstream of ``sigmoids`` that only post-process scores (data movement, TopK, ReduceMax).

    Excluding them keeps e.g. Concat(boxes, scores) from sharing one int8 scale between box
    coordinates and probabilities, and keeps TopK ranking fp32 scores.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in model.graph.node}
    tail: list[str] = []
    seen = set(sigmoids)
    stack = [o for s in sigmoids for o in by_name[s].output]
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name in seen or n.op_type not in _SCORE_TAIL_OPS:
                continue
            seen.add(n.name)
            tail.append(n.name)
            stack.extend(o for o in n.output if o)
    return tail


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed or duplicate-named nodes unique names (ModelOpt addresses nodes by name)."""
    used: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in used:
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            n.name = name
        used.add(n.name)


def canonical_value_info(graph: onnx.GraphProto) -> None:
    """Sort value_info by name, in subgraphs too, so a variant's bytes do not depend on the hash seed.

    AutoCast collects the tensors to cast in a Python set (``list(set(cast_to_fp16) - initializers)``
    in ModelOpt 0.47's precisionconverter) and appends their value_info in that order, which changes
    with PYTHONHASHSEED from one process to the next. value_info order carries no meaning; nodes stay
    as ModelOpt sorted them.
    """
    graph.value_info.sort(key=lambda v: v.name)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                canonical_value_info(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    canonical_value_info(g)


def anchor(name: str) -> str:
    """A pattern that (with ModelOpt's re.match) matches exactly this node name."""
    return re.escape(name) + "$"


def match_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes that one of ``patterns`` matches (with ``re.match``, as ModelOpt does)."""
    return [n.name for n in model.graph.node if any(re.match(p, n.name) for p in patterns)]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers: what a run feeds."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def first_samples(
    model: onnx.ModelProto, calib: Mapping[str, np.ndarray] | None, batches: int
) -> dict[str, np.ndarray] | None:
    """The first ``batches`` batches of ``calib`` (AutoCast keeps every activation of every batch)."""
    if calib is None:
        return None
    out = {}
    for vi in graph_inputs(model):
        d0 = vi.type.tensor_type.shape.dim
        batch = d0[0].dim_value if d0 and d0[0].HasField("dim_value") and d0[0].dim_value > 0 else 1
        out[vi.name] = calib[vi.name][: batches * batch]
    return out
