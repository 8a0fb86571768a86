"""A faithful fp16 emulation on the CPU, in fp32 arithmetic, of an AutoCast fp16 variant.

ONNX Runtime's CPU provider has no fp16 kernels for most ops: it runs an fp16 variant in fp32 and drops
the Cast pairs between ops (its InsertCastTransformer), so the fp16 variant judged there looks more
accurate than fp16 is, and keeping a node in fp32 can even look worse. Rule sensitivity (fp16) and rule
fallback (fp16-mixed) judge this emulation instead, built from the fp32 graph the variant was made from
(the surgery ONNX; AutoCast keeps node names and input positions):

* every tensor the fp16 variant stores in fp16 is rounded to fp16 and back: an fp16 node's float
  initializers at build time (numpy), its activations read in fp16 and its fp16 outputs by
  Cast(to=FLOAT16) -> Cast(to=FLOAT), read by the consumers in place of the tensor;
* everything else, and every op's arithmetic, is fp32.

That is fp16 storage with fp32 accumulation, which is how GPU fp16 kernels behave (TensorRT's and cuDNN's
fp16 convolutions and GEMMs accumulate in fp32). Its limit: an op that accumulates in fp16 inside a kernel
(a reduction or a softmax in fp16 arithmetic, some element-wise chains a GPU fuses) is rounded here only at
its output, so a variant whose error comes from fp16 accumulation looks better here than on the device;
the validation gate, on the device, is still the judge. ONNX Runtime CPU keeps the Cast pairs at every
graph optimisation level tested (kiln's tests check it at ORT_DISABLE_ALL, the level the judge runs the
emulation at: kiln.judge.session).

Below rule sensitivity and rule fallback, which both use it; it imports only kiln.precision.graph (node names).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.precision.graph import name_nodes

# Nodes that are never a region: Casts and Constants are AutoCast's plumbing or values, not compute.
PLUMBING = ("Cast", "Constant", "QuantizeLinear", "DequantizeLinear")
# Ops that move or select fp16 values without rounding them again: kept in fp32 alone they change nothing,
# so they are not ranked (they are still emulated: their fp16 inputs and outputs are rounded).
MOVES = ("Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Squeeze",
         "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Expand", "Tile", "Pad", "ScatterND", "MaxPool",
         "TopK", "NonZero", "Where", "Equal", "Greater", "Less", "Not", "And", "Or", "ArgMax", "ArgMin", "Relu",
         "ReduceMax", "ReduceMin")
SUFFIX = "__fp16emu"


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (graph IO, value_info, shape inference, initializers)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot walk: what the model itself declares
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:  # Constant nodes' values, where shape inference leaves them out
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                types.setdefault(n.output[0], a.t.data_type)
    return types


def fp16_storage(variant: onnx.ModelProto) -> dict[str, tuple[frozenset[int], frozenset[int]]]:
    """Node name -> (input positions, output positions) that the fp16 `variant` stores in fp16, for every
    node but Casts and Constants that has one: the nodes AutoCast converted."""
    types = tensor_types(variant)
    out = {}
    for n in variant.graph.node:
        if n.op_type in PLUMBING:
            continue
        ins = frozenset(k for k, i in enumerate(n.input) if i and types.get(i) == TensorProto.FLOAT16)
        outs = frozenset(k for k, o in enumerate(n.output) if o and types.get(o) == TensorProto.FLOAT16)
        if ins or outs:
            out[n.name] = (ins, outs)
    return out


def named(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the fp32 graph with its nodes named as rule precision named them before AutoCast."""
    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    name_nodes(m)
    return m


def regions(variant: onnx.ModelProto, fp32: onnx.ModelProto) -> list[dict]:
    """The fp16 nodes of `variant` that rule sensitivity ranks, in the fp32 graph's order: compute nodes
    (not :data:`MOVES`) that the fp32 graph (:func:`named`) has by the same name."""
    stored = fp16_storage(variant)
    return [{"node": n.name, "op_type": n.op_type, "fp16_inputs": len(stored[n.name][0])}
            for n in named(fp32).graph.node if n.name in stored and n.op_type not in MOVES]


def emulate(fp32: onnx.ModelProto, storage: dict[str, tuple[frozenset[int], frozenset[int]]],
            keep: set[str] = frozenset()) -> onnx.ModelProto:
    """A copy of the fp32 graph whose tensors the fp16 variant stores in fp16 (`storage`, of
    :func:`fp16_storage`) are rounded to fp16 and back; the nodes in `keep` are left fp32, as AutoCast's
    ``nodes_to_exclude`` would leave them (their fp16 neighbours still round what they read and write)."""
    m = named(fp32)
    g = m.graph
    types = tensor_types(fp32)
    inits = {i.name: i for i in g.initializer}
    rounded_inits: dict[str, str] = {}
    rounded_acts: dict[str, str] = {}  # tensor -> its rounded copy (read side)
    rounded_out: set[str] = set()  # tensors rounded where they are written: read as they are
    new_nodes: list[onnx.NodeProto] = []

    def cast_pair(src: str, dst: str) -> list[onnx.NodeProto]:
        half = f"{dst}{SUFFIX}_half"
        return [helper.make_node("Cast", [src], [half], name=f"{half}/Cast", to=TensorProto.FLOAT16),
                helper.make_node("Cast", [half], [dst], name=f"{dst}/Cast", to=TensorProto.FLOAT)]

    for n in g.node:
        ins, outs = storage.get(n.name, (frozenset(), frozenset())) if n.name not in keep else ((), ())
        before, after = [], []
        for k in ins:
            t = n.input[k] if k < len(n.input) else ""
            if not t or t in rounded_out or types.get(t) != TensorProto.FLOAT:
                continue
            if t in inits:  # fp16 weights: rounded once, at build time
                if t not in rounded_inits:
                    rounded_inits[t] = f"{t}{SUFFIX}"
                    w = numpy_helper.to_array(inits[t]).astype(np.float16).astype(np.float32)
                    g.initializer.append(numpy_helper.from_array(w, rounded_inits[t]))
                n.input[k] = rounded_inits[t]
            else:
                if t not in rounded_acts:
                    rounded_acts[t] = f"{t}{SUFFIX}"
                    before += cast_pair(t, rounded_acts[t])
                n.input[k] = rounded_acts[t]
        for k in outs:
            t = n.output[k] if k < len(n.output) else ""
            if not t or types.get(t) != TensorProto.FLOAT:
                continue
            # The node writes the raw value under a new name; the pair writes the tensor's own name, so every
            # consumer and a graph output read the rounded value.
            raw = f"{t}{SUFFIX}_raw"
            n.output[k] = raw
            after += cast_pair(raw, t)
            rounded_out.add(t)
        new_nodes += [*before, n, *after]
    del g.node[:]
    g.node.extend(new_nodes)
    return m
