"""Stage `surgery`: onnx-graphsurgeon passes chosen per model in config, plus those a device needs.

The passes of a (model, opset) are the model's own ``surgery`` list, then every rewrite that a
device building this model at this opset requires by Kiln's op table (:mod:`kiln.backends.trt.ops`; e.g.
``decompose_layernorm`` for TensorRT 8.5, whose parser has no LayerNormalization), then, when the
model asks for it, NMS appended to the graph (``nms: onnx`` or ``efficient``).

Why device passes go into the shared (model, opset) graph rather than a per-device one: the
rewrites in the table are numerically neutral (each is tested for equality with ONNX Runtime
before/after), so every device sharing the opset can run the rewritten graph and gets the same
fp32 reference; the artifact paths and the reference per (model, opset) stay as they are. The
price is that a device whose parser has the native op (an RTX beside a TensorRT 8.5 Jetson at the
same opset) builds the decomposed form too; ``surgery.json`` names the device that asked for each
pass, and giving the older device its own opset (16 for LayerNormalization) keeps the others'
graphs untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.util import atomic_path, write_json

log = logging.getLogger(__name__)

# Nodes that only matter in training; at inference they are identities.
TRAINING_ONLY_OPS = ("Dropout", "Identity")
# Output names of a graph with NMS appended (EfficientNMS_TRT's four outputs, renamed).
NMS_OUTPUTS = ("num_detections", "boxes", "scores", "classes")


def device_passes(cfg, model: str, opset: int) -> dict[str, list[str]]:
    """Rewrites the devices building `model` at `opset` need by the op table: pass -> device names."""
    from kiln import backends

    out: dict[str, list[str]] = {}
    for d in cfg.devices.values():
        if model in d.models and d.opset == opset:
            for name in backends.get(d.backend).required_passes(d, opset):
                out.setdefault(name, []).append(d.name)
    return out


def passes_for(cfg, model: str, opset: int) -> list[str]:
    """The model's passes, then the device-required ones it lacks (before a final infer_shapes)."""
    own = list(cfg.models[model].surgery)
    extra = [p for p in device_passes(cfg, model, opset) if p not in own]
    if not extra:
        return own
    tail = ["infer_shapes"] if own and own[-1] == "infer_shapes" else []
    return own[: len(own) - len(tail)] + extra + tail


def params(cfg, model: str, opset: int | None = None) -> dict:
    """What changes surgery.onnx: the passes (model's and devices'), and the NMS appended."""
    m = cfg.models[model]
    if opset is None:
        return {"surgery": list(m.surgery)}
    out: dict = {"surgery": passes_for(cfg, model, opset)}
    if m.nms != "none":
        out["nms"] = nms_options(m)
    return out


def nms_options(spec) -> dict:
    return {"kind": spec.nms, "conf_threshold": spec.decode["conf_threshold"],
            "iou_threshold": spec.decode["iou_threshold"], "max_det": spec.decode["max_det"]}


def _remove_training_nodes(graph) -> None:
    """Bypass Dropout/Identity nodes, keeping graph outputs' names intact."""
    for node in list(graph.nodes):
        if node.op not in TRAINING_ONLY_OPS or not node.inputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if out in graph.outputs:
            # The graph output keeps its name: rewire the producer of src instead.
            if not src.inputs or src in graph.inputs:
                continue
            producer = src.inputs[0]
            producer.outputs = [out if t is src else t for t in producer.outputs]
            for consumer in list(src.outputs):
                if consumer is not node:
                    consumer.inputs = [out if t is src else t for t in consumer.inputs]
        else:
            for consumer in list(out.outputs):
                consumer.inputs = [src if t is out else t for t in consumer.inputs]
        node.outputs.clear()
        node.inputs.clear()
    graph.cleanup()


def _fold_constants(graph) -> None:
    graph.fold_constants()


def _cleanup(graph) -> None:
    graph.cleanup().toposort()


# --------------------------------------------------------------------------------------------------
# Rewrites for older parsers (the device's backend says which it needs: kiln/backends/trt/ops.py)


def _const(name: str, value, dtype) -> object:
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.asarray(value, dtype=dtype))


def _dtypes_by_name(graph) -> dict[str, np.dtype]:
    """Element types of every tensor, by ONNX shape inference on a copy (graphsurgeon may not know them)."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import helper

    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph.copy()), strict_mode=False)
    out = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        et = vi.type.tensor_type.elem_type
        if et:
            out[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(et))
    return out


def _dtype(tensor, known: dict) -> np.dtype | None:
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    if tensor.dtype is not None:
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            pass
    return known.get(tensor.name)


def _reduce_mean(graph, x, axes: list[int], name: str):
    """ReduceMean over `axes`, keepdims: an attribute before opset 18, an input from 18 on."""
    if graph.opset >= 18:
        return graph.layer(op="ReduceMean", name=name, inputs=[x, _const(f"{name}/axes", axes, np.int64)],
                           outputs=[f"{name}_out"], attrs={"keepdims": 1})[0]
    return graph.layer(op="ReduceMean", name=name, inputs=[x], outputs=[f"{name}_out"],
                       attrs={"axes": axes, "keepdims": 1})[0]


def _decompose_layernorm(graph) -> dict:
    """Rewrite LayerNormalization (opset 17) as ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add.

    The same arithmetic PyTorch exports below opset 17; TensorRT 8.5's parser takes every op of it.
    A LayerNormalization whose Mean/InvStdDev outputs are consumed (training graphs) is refused.
    """
    done = []
    known: dict | None = None
    for k, node in enumerate(list(graph.nodes)):
        if node.op != "LayerNormalization" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        used = [o.name for o in node.outputs[1:] if o.outputs or o in graph.outputs]
        if used:
            raise KilnError(f"decompose_layernorm: node '{node.name}' uses LayerNormalization's Mean/InvStdDev "
                            f"outputs ({', '.join(used)}), which an inference graph does not: export in eval mode")
        x, scale = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        axis = int(node.attrs.get("axis", -1))
        eps = float(node.attrs.get("epsilon", 1e-5))
        if axis < 0:
            axes = list(range(axis, 0))
        elif x.shape is not None:
            axes = list(range(axis, len(x.shape)))
        else:
            raise KilnError(f"decompose_layernorm: node '{node.name}' has axis {axis} on an input of unknown rank: "
                            f"run infer_shapes before it (or export with axis=-1)")
        if known is None:
            known = _dtypes_by_name(graph)
        dtype = _dtype(x, known) or np.dtype(np.float32)
        y = node.outputs[0]
        base = node.name or f"LayerNormalization_{k}"
        node.inputs.clear()
        node.outputs.clear()
        mean = _reduce_mean(graph, x, axes, f"{base}/mean")
        diff = graph.layer(op="Sub", name=f"{base}/sub", inputs=[x, mean], outputs=[f"{base}/sub_out"])[0]
        sq = graph.layer(op="Mul", name=f"{base}/square", inputs=[diff, diff], outputs=[f"{base}/square_out"])[0]
        var = _reduce_mean(graph, sq, axes, f"{base}/var")
        var_eps = graph.layer(op="Add", name=f"{base}/add_eps", inputs=[var, _const(f"{base}/eps", eps, dtype)],
                              outputs=[f"{base}/add_eps_out"])[0]
        std = graph.layer(op="Sqrt", name=f"{base}/sqrt", inputs=[var_eps], outputs=[f"{base}/sqrt_out"])[0]
        norm = graph.layer(op="Div", name=f"{base}/div", inputs=[diff, std], outputs=[f"{base}/div_out"])[0]
        if bias is None:
            graph.layer(op="Mul", name=f"{base}/scale", inputs=[norm, scale], outputs=[y])
        else:
            scaled = graph.layer(op="Mul", name=f"{base}/scale", inputs=[norm, scale], outputs=[f"{base}/scale_out"])[0]
            graph.layer(op="Add", name=f"{base}/bias", inputs=[scaled, bias], outputs=[y])
        done.append(base)
    graph.cleanup().toposort()
    return {"rewritten": len(done), "nodes_rewritten": done}


def _replace_mod(graph) -> dict:
    """Rewrite Mod without the Mod op: integer Python-style remainder, or C fmod for floats.

    Integers (fmod=0): r = a - trunc(a / b) * b, plus b where r != 0 and r, b differ in sign, which
    is ONNX's (and Python's) sign-of-divisor remainder for every sign. Floats: fmod=1 is
    a - trunc(a / b) * b, fmod=0 a - floor(a / b) * b. Only primitive ops (Div, Mul, Sub, Less,
    Xor, Equal, Not, And, Where, Floor, Ceil) that TensorRT 8.x parses.
    """
    done = []
    known: dict | None = None
    for k, node in enumerate(list(graph.nodes)):
        if node.op != "Mod" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        a, b = node.inputs[0], node.inputs[1]
        if known is None:
            known = _dtypes_by_name(graph)
        dtype = _dtype(a, known) or _dtype(b, known)
        if dtype is None:
            raise KilnError(f"replace_mod: the type of Mod node '{node.name}''s inputs is unknown: run infer_shapes "
                            f"before replace_mod")
        fmod = int(node.attrs.get("fmod", 0))
        y = node.outputs[0]
        base = node.name or f"Mod_{k}"
        node.inputs.clear()
        node.outputs.clear()
        L = graph.layer

        def v(suffix, base=base):
            return f"{base}/{suffix}"

        q = L(op="Div", name=v("div"), inputs=[a, b], outputs=[v("div_out")])[0]
        zero = _const(v("zero"), 0, dtype)
        if np.issubdtype(dtype, np.integer):
            prod = L(op="Mul", name=v("mul"), inputs=[q, b], outputs=[v("mul_out")])[0]
            r = L(op="Sub", name=v("sub"), inputs=[a, prod], outputs=[v("sub_out")])[0]
            r_neg = L(op="Less", name=v("r_neg"), inputs=[r, zero], outputs=[v("r_neg_out")])[0]
            b_neg = L(op="Less", name=v("b_neg"), inputs=[b, zero], outputs=[v("b_neg_out")])[0]
            differ = L(op="Xor", name=v("signs_differ"), inputs=[r_neg, b_neg], outputs=[v("signs_differ_out")])[0]
            is_zero = L(op="Equal", name=v("r_zero"), inputs=[r, zero], outputs=[v("r_zero_out")])[0]
            nonzero = L(op="Not", name=v("r_nonzero"), inputs=[is_zero], outputs=[v("r_nonzero_out")])[0]
            fix = L(op="And", name=v("fix"), inputs=[differ, nonzero], outputs=[v("fix_out")])[0]
            shifted = L(op="Add", name=v("add_b"), inputs=[r, b], outputs=[v("add_b_out")])[0]
            L(op="Where", name=v("where"), inputs=[fix, shifted, r], outputs=[y])
        else:
            if fmod:  # trunc(q) = floor(q) for q >= 0, ceil(q) below
                fl = L(op="Floor", name=v("floor"), inputs=[q], outputs=[v("floor_out")])[0]
                ce = L(op="Ceil", name=v("ceil"), inputs=[q], outputs=[v("ceil_out")])[0]
                neg = L(op="Less", name=v("q_neg"), inputs=[q, zero], outputs=[v("q_neg_out")])[0]
                t = L(op="Where", name=v("trunc"), inputs=[neg, ce, fl], outputs=[v("trunc_out")])[0]
            else:
                t = L(op="Floor", name=v("floor"), inputs=[q], outputs=[v("floor_out")])[0]
            prod = L(op="Mul", name=v("mul"), inputs=[t, b], outputs=[v("mul_out")])[0]
            L(op="Sub", name=v("sub"), inputs=[a, prod], outputs=[y])
        done.append(base)
    graph.cleanup().toposort()
    return {"rewritten": len(done), "nodes_rewritten": done}


PASSES: dict[str, Callable] = {
    "remove_training_nodes": _remove_training_nodes,
    "fold_constants": _fold_constants,
    "cleanup": _cleanup,
    "decompose_layernorm": _decompose_layernorm,
    "replace_mod": _replace_mod,
}


# --------------------------------------------------------------------------------------------------
# NMS in the graph


def append_nms(graph, kind: str, conf_threshold: float, iou_threshold: float, max_det: int) -> dict:
    """Append NMS to a YOLO-layout graph (one output ``output0`` (B, 4+nc, A), cx cy w h then scores).

    The graph's outputs become ``num_detections`` (B, 1) int32, ``boxes`` (B, max_det, 4) float xyxy
    in input pixels, ``scores`` (B, max_det) and ``classes`` (B, max_det) int32, best first per
    image, zero past ``num_detections`` (EfficientNMS_TRT's layout).

    ``kind="onnx"``: the ONNX NonMaxSuppression op (class-aware, per image), then one TopK over a
    (B, N + max_det) score matrix that keeps each image's own detections (a -1 padding column block
    makes K a constant, which TensorRT < 10 requires). Runs in ONNX Runtime and on TensorRT >= 8.5.
    ``kind="efficient"``: TensorRT's EfficientNMS_TRT plugin: no ONNX Runtime, no TensorRT-RTX.
    """
    import onnx_graphsurgeon as gs

    outs = {t.name: t for t in graph.outputs}
    if list(outs) != ["output0"]:
        raise KilnError(f"NMS needs a YOLO-layout graph with the one output 'output0'; this graph has outputs "
                        f"{list(outs)}: set 'nms: none' for this model")
    raw = outs["output0"]
    L = graph.layer
    f32, i64 = np.float32, np.int64
    big = np.iinfo(np.int64).max
    # (B, 4+nc, A): boxes rows 0..3, scores rows 4.. ; Slice along axis 1.
    cxcywh_t = L(op="Slice", name="nms/boxes_slice", outputs=["nms/boxes_cxcywh_t"],
                 inputs=[raw, _const("nms/s0", [0], i64), _const("nms/s4", [4], i64), _const("nms/ax1", [1], i64)])[0]
    scores_t = L(op="Slice", name="nms/scores_slice", outputs=["nms/scores_bca"],
                 inputs=[raw, _const("nms/s4b", [4], i64), _const("nms/send", [big], i64), _const("nms/ax1b", [1], i64)])[0]
    cxcywh = L(op="Transpose", name="nms/boxes_transpose", inputs=[cxcywh_t], outputs=["nms/boxes_cxcywh"],
               attrs={"perm": [0, 2, 1]})[0]
    to_xyxy = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], dtype=f32)
    xyxy = L(op="MatMul", name="nms/to_xyxy", inputs=[cxcywh, _const("nms/xyxy_matrix", to_xyxy, f32)],
             outputs=["nms/boxes_xyxy"])[0]
    names = list(NMS_OUTPUTS)

    if kind == "efficient":
        scores_bac = L(op="Transpose", name="nms/scores_transpose", inputs=[scores_t], outputs=["nms/scores_bac"],
                       attrs={"perm": [0, 2, 1]})[0]
        out = [gs.Variable(n, dtype=dt) for n, dt in zip(names, (np.int32, f32, f32, np.int32))]
        graph.nodes.append(gs.Node(
            op="EfficientNMS_TRT", name="nms/EfficientNMS_TRT", inputs=[xyxy, scores_bac], outputs=out,
            attrs={"plugin_version": "1", "background_class": -1, "max_output_boxes": int(max_det),
                   "score_threshold": float(conf_threshold), "iou_threshold": float(iou_threshold),
                   "score_activation": 0, "class_agnostic": 0, "box_coding": 0}))
        out[0].shape = ["batch", 1]
        out[1].shape = ["batch", int(max_det), 4]
        out[2].shape = ["batch", int(max_det)]
        out[3].shape = ["batch", int(max_det)]
    elif kind == "onnx":
        sel = L(op="NonMaxSuppression", name="nms/NonMaxSuppression", outputs=["nms/selected"],
                inputs=[xyxy, scores_t, _const("nms/max_per_class", [int(max_det)], i64),
                        _const("nms/iou", [float(iou_threshold)], f32), _const("nms/conf", [float(conf_threshold)], f32)],
                attrs={"center_point_box": 0})[0]  # (N, 3): batch, class, anchor

        def col(i, name):
            return L(op="Gather", name=f"nms/{name}", inputs=[sel, _const(f"nms/{name}_idx", i, i64)],
                     outputs=[f"nms/{name}_out"], attrs={"axis": 1})[0]

        sel_b, sel_c = col(0, "sel_batch"), col(1, "sel_class")  # (N,)
        sel_ba = col([0, 2], "sel_batch_anchor")  # (N, 2)
        sel_scores = L(op="GatherND", name="nms/sel_scores", inputs=[scores_t, sel], outputs=["nms/sel_scores_out"])[0]
        sel_boxes = L(op="GatherND", name="nms/sel_boxes", inputs=[xyxy, sel_ba], outputs=["nms/sel_boxes_out"])[0]
        # Batch size B, and a (B, 1) column of image indices.
        shape = L(op="Shape", name="nms/shape", inputs=[raw], outputs=["nms/shape_out"])[0]
        b_dim = L(op="Gather", name="nms/batch", inputs=[shape, _const("nms/zero_idx", 0, i64)], outputs=["nms/batch_out"],
                  attrs={"axis": 0})[0]
        ids = L(op="Range", name="nms/image_ids", inputs=[_const("nms/r0", 0, i64), b_dim, _const("nms/r1", 1, i64)],
                outputs=["nms/image_ids_out"])[0]
        ids_col = L(op="Unsqueeze", name="nms/image_ids_col", inputs=[ids, _const("nms/ax1c", [1], i64)],
                    outputs=["nms/image_ids_col_out"])[0]
        mine = L(op="Equal", name="nms/own_image", inputs=[ids_col, sel_b], outputs=["nms/own_image_out"])[0]  # (B, N)
        dense = L(op="Where", name="nms/dense_scores", inputs=[mine, sel_scores, _const("nms/minus1", -1.0, f32)],
                  outputs=["nms/dense_scores_out"])[0]
        pad_shape = L(op="Concat", name="nms/pad_shape", outputs=["nms/pad_shape_out"], attrs={"axis": 0},
                      inputs=[L(op="Unsqueeze", name="nms/batch_1d", inputs=[b_dim, _const("nms/ax0", [0], i64)],
                                outputs=["nms/batch_1d_out"])[0], _const("nms/max_det", [int(max_det)], i64)])[0]
        pad = L(op="ConstantOfShape", name="nms/pad", inputs=[pad_shape], outputs=["nms/pad_out"],
                attrs={"value": gs.Constant("nms/pad_value", np.array([-1.0], dtype=f32))})[0]
        padded = L(op="Concat", name="nms/padded_scores", inputs=[dense, pad], outputs=["nms/padded_scores_out"],
                   attrs={"axis": 1})[0]
        top_scores, top_idx = L(op="TopK", name="nms/topk", inputs=[padded, _const("nms/k", [int(max_det)], i64)],
                                outputs=["nms/top_scores", "nms/top_idx"], attrs={"axis": 1, "largest": 1, "sorted": 1})
        valid = L(op="Greater", name="nms/valid", inputs=[top_scores, _const("nms/minus_half", -0.5, f32)],
                  outputs=["nms/valid_out"])[0]
        valid_i = L(op="Cast", name="nms/valid_int", inputs=[valid], outputs=["nms/valid_int_out"], attrs={"to": 6})[0]
        num = gs.Variable("num_detections", dtype=np.int32, shape=["batch", 1])
        L(op="ReduceSum", name="nms/count", inputs=[valid_i, _const("nms/ax1d", [1], i64)], outputs=[num],
          attrs={"keepdims": 1})
        # Rows past N point into zero padding, so boxes and classes of empty slots are 0.
        boxes_src = L(op="Concat", name="nms/boxes_padded", outputs=["nms/boxes_padded_out"], attrs={"axis": 0},
                      inputs=[sel_boxes, _const("nms/zero_boxes", np.zeros((int(max_det), 4)), f32)])[0]
        cls_src = L(op="Concat", name="nms/classes_padded", outputs=["nms/classes_padded_out"], attrs={"axis": 0},
                    inputs=[sel_c, _const("nms/zero_classes", np.zeros(int(max_det)), i64)])[0]
        boxes = gs.Variable("boxes", dtype=f32, shape=["batch", int(max_det), 4])
        L(op="Gather", name="nms/gather_boxes", inputs=[boxes_src, top_idx], outputs=[boxes], attrs={"axis": 0})
        cls64 = L(op="Gather", name="nms/gather_classes", inputs=[cls_src, top_idx], outputs=["nms/classes64"],
                  attrs={"axis": 0})[0]
        classes = gs.Variable("classes", dtype=np.int32, shape=["batch", int(max_det)])
        L(op="Cast", name="nms/classes_int32", inputs=[cls64], outputs=[classes], attrs={"to": 6})
        scores = gs.Variable("scores", dtype=f32, shape=["batch", int(max_det)])
        L(op="Where", name="nms/scores_masked", inputs=[valid, top_scores, _const("nms/zero_score", 0.0, f32)],
          outputs=[scores])
        out = [num, boxes, scores, classes]
    else:
        raise KilnError(f"unknown nms kind {kind!r}: use onnx, efficient or none")
    raw.name = "nms/output0"  # no longer a graph output
    graph.outputs = out
    graph.cleanup().toposort()
    return {"pass": f"nms_{kind}", "nodes": len(graph.nodes), "max_det": int(max_det),
            "conf_threshold": float(conf_threshold), "iou_threshold": float(iou_threshold)}


def run_passes(src: str | Path, dst: str | Path, record: str | Path, passes: list[str], nms: dict | None = None,
               required_by: dict[str, list[str]] | None = None) -> dict:
    """Apply `passes` in order to `src`, then NMS when `nms` is given; write `dst` and a record.

    The record lists node counts per pass, what each rewrite changed, and which device asked for
    a pass (``required_by``, from :func:`device_passes`).
    """
    import onnx
    import onnx_graphsurgeon as gs

    unknown = [p for p in passes if p not in PASSES and p != "infer_shapes"]
    if unknown:
        raise KilnError(f"unknown surgery pass(es) {', '.join(unknown)}: known are {', '.join([*PASSES, 'infer_shapes'])}")
    model = onnx.load(str(src))
    opset = model.opset_import
    graph = gs.import_onnx(model)
    steps = [{"pass": "input", "nodes": len(graph.nodes)}]
    for name in passes:
        if name == "infer_shapes":
            continue  # runs on the exported proto below
        detail = PASSES[name](graph)
        step = {"pass": name, "nodes": len(graph.nodes)}
        if isinstance(detail, dict):
            step.update(detail)
        if required_by and name in required_by:
            step["required_by"] = list(required_by[name])
        steps.append(step)
        log.info("surgery %s: %d nodes", name, len(graph.nodes))
    if nms:
        steps.append(append_nms(graph, nms["kind"], nms["conf_threshold"], nms["iou_threshold"], nms["max_det"]))
        log.info("surgery: NMS (%s) appended", nms["kind"])
    out = gs.export_onnx(graph)
    # graphsurgeon may renumber the default opset import; keep the exported one exactly.
    del out.opset_import[:]
    out.opset_import.extend(opset)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)  # names, stride, imgsz, layout (kiln.export): graphsurgeon drops them
    if "infer_shapes" in passes:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=True)
        steps.append({"pass": "infer_shapes", "value_infos": len(out.graph.value_info)})
    # A plugin op (EfficientNMS_TRT) is no ONNX op: the checker would refuse the whole graph.
    if not (nms and nms["kind"] == "efficient"):
        onnx.checker.check_model(out)
    with atomic_path(dst) as tmp:
        onnx.save(out, str(tmp))
    info = {"tool": f"onnx-graphsurgeon {gs.__version__}", "passes": steps}
    write_json(record, info)
    return info


def run_rule(cfg, job) -> None:
    """Rule `surgery`: the model's and its devices' passes, and NMS where asked."""
    spec, w = job.params.spec, job.wildcards
    # Which device asked for which pass goes into the record only (not a param: renaming a device reruns nothing).
    run_passes(job.input[0], job.output.onnx, job.output.record, spec["surgery"], nms=spec.get("nms"),
               required_by=device_passes(cfg, w.model, int(w.opset)))
