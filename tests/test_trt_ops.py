"""The per-TensorRT op table (kiln/backends/trt/ops.py) and the surgery passes it calls for: numerically neutral.

Each rewrite is checked by running the graph in ONNX Runtime before and after. What TensorRT
8.5/8.6/10/11 would say is the table's (their parsers are not installable here); what TensorRT-RTX
says is run, with the parser installed on this host.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import tiny_config
from onnx import TensorProto, helper

from kiln import surgery
from kiln.backends import tensorrt_rtx
from kiln.backends.trt import importer, parser
from kiln.backends.trt import ops as trt_ops
from kiln.config import load
from kiln.errors import KilnError

needs_rtx = pytest.mark.skipif(not tensorrt_rtx.is_available(), reason="TensorRT-RTX is not installed")


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def save(tmp_path, name, nodes, inputs, outputs, opset=17, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# The table


def test_parser_max_opset_per_version():
    assert trt_ops.parser_max_opset("tensorrt", "8.5.2") == 17
    assert trt_ops.parser_max_opset("tensorrt", "8.6") == 17
    assert trt_ops.parser_max_opset("tensorrt", "10.3") == 20
    assert trt_ops.parser_max_opset("tensorrt", "10.15") == 24
    assert trt_ops.parser_max_opset("tensorrt", "11.0") == 25
    assert trt_ops.parser_max_opset("tensorrt", "8.4") is None  # before the table: unknown
    assert trt_ops.parser_max_opset("tensorrt-rtx", "1.7.1.116") == 25
    # The backends read the same table.
    assert importer.parser_max_opset("10.13.0.35") == 20 and importer.PARSER_MAX_OPSET[(11, 0)] == 25


@pytest.mark.parametrize("flavor, version, op, supported", [
    ("tensorrt", "8.5", "LayerNormalization", False),
    ("tensorrt", "8.6", "LayerNormalization", True),
    ("tensorrt", "10.13", "LayerNormalization", True),
    ("tensorrt", "11.0", "LayerNormalization", True),
    ("tensorrt-rtx", "1.7", "LayerNormalization", True),
    ("tensorrt", "8.4", "GridSample", False),
    ("tensorrt", "8.5", "GridSample", True),
    ("tensorrt", "8.4", "Mod", False),
    ("tensorrt", "8.5", "Mod", True),
    ("tensorrt", "8.5", "NonMaxSuppression", True),
    ("tensorrt-rtx", "1.7", "NonMaxSuppression", False),  # parses, but the builder has no implementation
    ("tensorrt", "8.5", "EfficientNMS_TRT", True),
    ("tensorrt-rtx", "1.7", "EfficientNMS_TRT", False),
    ("tensorrt", "10.13", "Det", False),
    ("tensorrt", "10.13", "Conv", None),  # not in the table: no opinion
])
def test_op_support_by_version(flavor, version, op, supported):
    assert trt_ops.supports(flavor, version, op) is supported


def test_required_passes_depend_on_version_and_opset():
    assert trt_ops.required_passes("tensorrt", "8.5", 17) == ["decompose_layernorm"]
    assert trt_ops.required_passes("tensorrt", "8.5", 16) == []  # no LayerNormalization below opset 17
    assert trt_ops.required_passes("tensorrt", "8.6", 17) == []
    assert trt_ops.required_passes("tensorrt", "10.13", 20) == []
    assert trt_ops.required_passes("tensorrt-rtx", "1.7", 17) == []
    assert trt_ops.required_passes("tensorrt", "8.4", 17) == ["decompose_layernorm", "replace_mod"]
    assert trt_ops.unsupported("tensorrt", "8.5", ["Conv", "LayerNormalization", "Mod"]) == ["LayerNormalization"]


def test_hint_names_node_version_and_fixes():
    assert trt_ops.hint("tensorrt", "8.5", "LayerNormalization", "/encoder/ln_3") == (
        "LayerNormalization at /encoder/ln_3 is not supported by TensorRT 8.5 (from TensorRT 8.6 on): "
        "export at opset 16 or enable decompose_layernorm")
    h = trt_ops.hint("tensorrt-rtx", "1.7.1.116", "EfficientNMS_TRT", "nms/EfficientNMS_TRT")
    assert "not supported by TensorRT-RTX 1.7" in h and "nms: onnx" in h
    assert "does not list" in trt_ops.hint("tensorrt", "10.13", "FancyOp", "n1")


def test_device_passes_join_the_shared_opset_graph():
    """A TensorRT 8.5 device at opset 17 adds decompose_layernorm to (model, opset 17); an opset-16 one adds none."""
    raw = tiny_config()
    raw["devices"]["orin"] = {"backend": "tensorrt", "compute_capability": "8.7", "tensorrt": {"min": "8.5"},
                              "jetson": True, "opset": 17, "precisions": ["fp16"], "int8_mode": "calibrator"}
    cfg = load(copy.deepcopy(raw), check_paths=False)
    assert surgery.device_passes(cfg, "rtdetr_demo", 17) == {"decompose_layernorm": ["orin"]}
    p = surgery.params(cfg, "rtdetr_demo", 17)
    assert p["surgery"] == ["remove_training_nodes", "fold_constants", "cleanup", "decompose_layernorm", "infer_shapes"]
    raw["devices"]["orin"]["opset"] = 16
    cfg = load(raw, check_paths=False)
    assert surgery.device_passes(cfg, "rtdetr_demo", 17) == {} and surgery.device_passes(cfg, "rtdetr_demo", 16) == {}
    # Nothing required: the params are what they were before device passes existed (no spurious reruns).
    assert surgery.params(cfg, "rtdetr_demo", 17) == {"surgery": list(cfg.models["rtdetr_demo"].surgery)}


# --------------------------------------------------------------------------------------------------
# decompose_layernorm


@pytest.mark.parametrize("opset, axis, bias", [(17, -1, True), (18, -1, False), (17, 1, True), (18, -2, True)])
def test_decompose_layernorm_matches_onnxruntime(tmp_path, opset, axis, bias):
    rng = np.random.default_rng(0)
    shape = [2, 5, 8]
    norm = shape[axis:] if axis < 0 else shape[axis:]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, norm, rng.normal(size=norm).astype(np.float32).ravel())]
    names = ["x", "scale"]
    if bias:
        inits.append(helper.make_tensor("bias", TensorProto.FLOAT, norm, rng.normal(size=norm).astype(np.float32).ravel()))
        names.append("bias")
    node = helper.make_node("LayerNormalization", names, ["y"], name="/encoder/ln_3", axis=axis, epsilon=1e-5)
    src = save(tmp_path, "ln", [node], [x], [y], opset, inits)
    dst = tmp_path / "out.onnx"
    rec = surgery.run_passes(src, dst, tmp_path / "r.json", ["decompose_layernorm", "infer_shapes"])
    assert "LayerNormalization" not in ops(dst)
    assert rec["passes"][1]["rewritten"] == 1 and rec["passes"][1]["nodes_rewritten"] == ["/encoder/ln_3"]
    feeds = {"x": (rng.normal(size=shape) * 3 + 1).astype(np.float32)}
    np.testing.assert_allclose(run(dst, feeds)[0], run(src, feeds)[0], rtol=1e-5, atol=1e-5)


def test_decompose_layernorm_on_an_export(tmp_path):
    """The demo RT-DETR at opset 17 exports LayerNormalization; decomposed, its outputs stay the same."""
    import torch

    from kiln.demo.models import rtdetr_demo

    torch.manual_seed(0)
    src = tmp_path / "r17.onnx"
    torch.onnx.export(rtdetr_demo(num_classes=3).eval(), (torch.rand(1, 3, 128, 128), torch.tensor([[128, 128]])),
                      str(src), opset_version=17, dynamo=False, input_names=["images", "orig_target_sizes"],
                      output_names=["labels", "boxes", "scores"])
    assert "LayerNormalization" in ops(src)
    dst = tmp_path / "out.onnx"
    surgery.run_passes(src, dst, tmp_path / "r.json", ["decompose_layernorm", "cleanup", "infer_shapes"])
    assert "LayerNormalization" not in ops(dst) and "ReduceMean" in ops(dst)
    feeds = {"images": np.random.default_rng(1).random((1, 3, 128, 128), dtype=np.float32),
             "orig_target_sizes": np.array([[640, 480]], dtype=np.int64)}
    before, after = run(src, feeds), run(dst, feeds)
    np.testing.assert_array_equal(before[0], after[0])  # labels
    np.testing.assert_allclose(after[1], before[1], rtol=1e-4, atol=1e-3)  # boxes in pixels
    np.testing.assert_allclose(after[2], before[2], rtol=1e-5, atol=1e-6)  # scores


# --------------------------------------------------------------------------------------------------
# replace_mod


def test_replace_mod_integers_every_sign(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.INT64, [4, 6])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [1, 6])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [4, 6])
    src = save(tmp_path, "mod", [helper.make_node("Mod", ["a", "b"], ["y"], name="labels_mod")], [a, b], [y])
    dst = tmp_path / "out.onnx"
    rec = surgery.run_passes(src, dst, tmp_path / "r.json", ["replace_mod"])
    assert "Mod" not in ops(dst) and rec["passes"][1]["rewritten"] == 1
    av = np.array([[-7, -6, -1, 0, 1, 7], [7, 6, 5, -5, -12, 13], [0, 3, -3, 9, -9, 100], [1, 2, 3, 4, 5, 6]], np.int64)
    bv = np.array([[3, -3, 2, -2, 5, -4]], np.int64)
    got = run(dst, {"a": av, "b": bv})[0]
    np.testing.assert_array_equal(got, run(src, {"a": av, "b": bv})[0])
    np.testing.assert_array_equal(got, np.mod(av, bv))  # Python's sign-of-divisor remainder


@pytest.mark.parametrize("fmod", [0, 1])
def test_replace_mod_floats(tmp_path, fmod):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [2.5])
    src = save(tmp_path, "fmod", [helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)], [a], [y], inits=[b])
    dst = tmp_path / "out.onnx"
    surgery.run_passes(src, dst, tmp_path / "r.json", ["replace_mod"])
    assert "Mod" not in ops(dst)
    av = np.array([-7.5, -6.0, -1.25, 0.0, 1.25, 7.0, 9.75, -0.5], np.float32)
    expected = np.fmod(av, 2.5) if fmod else np.mod(av, 2.5)
    np.testing.assert_allclose(run(dst, {"a": av})[0], expected, atol=1e-6)
    if fmod:  # ONNX Runtime runs float Mod only with fmod=1
        np.testing.assert_allclose(run(dst, {"a": av})[0], run(src, {"a": av})[0], atol=1e-6)


def test_replace_mod_on_rtdetr_postprocessor(tmp_path):
    """RT-DETR's `index % num_classes` (the demo's postprocessor) rewritten; labels stay identical."""
    import torch

    from kiln.demo.models import rtdetr_demo

    torch.manual_seed(0)
    src = tmp_path / "r.onnx"
    torch.onnx.export(rtdetr_demo(num_classes=3).eval(), (torch.rand(2, 3, 128, 128), torch.tensor([[128, 128]] * 2)),
                      str(src), opset_version=16, dynamo=False, input_names=["images", "orig_target_sizes"],
                      output_names=["labels", "boxes", "scores"], dynamic_axes={"images": {0: "b"}})
    assert "Mod" in ops(src)
    dst = tmp_path / "out.onnx"
    surgery.run_passes(src, dst, tmp_path / "rec.json", ["replace_mod", "infer_shapes"])
    assert "Mod" not in ops(dst)
    rng = np.random.default_rng(2)
    feeds = {"images": rng.random((2, 3, 128, 128), dtype=np.float32),
             "orig_target_sizes": np.array([[640, 480], [320, 200]], dtype=np.int64)}
    from kiln.parity import detections as match
    from kiln.postprocess import rtdetr_detections

    before, after = run(src, feeds), run(dst, feeds)
    np.testing.assert_allclose(after[2], before[2], rtol=1e-5)  # scores, sorted
    # Random weights give tied scores, whose order in TopK is not defined: match them as detections.
    m = match(rtdetr_detections(*before), rtdetr_detections(*after), min_score=0.0, iou=0.99)
    assert m["match_rate"] == 1.0


@needs_rtx
def test_rewritten_graphs_parse_on_tensorrt_rtx(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.INT64, [4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [4, 6])
    k = helper.make_tensor("k", TensorProto.INT64, [], [3])
    src = save(tmp_path, "mod", [helper.make_node("Mod", ["a", "k"], ["y"])], [a], [y], inits=[k])
    dst = tmp_path / "out.onnx"
    surgery.run_passes(src, dst, tmp_path / "r.json", ["replace_mod"])
    ns = importer.polygraphy_trt("tensorrt-rtx")
    parser.parse_onnx(ns, dst, strongly_typed=True)  # raises KilnError on a parser refusal


# --------------------------------------------------------------------------------------------------
# NMS appended to the graph


def raw_yolo_graph(tmp_path, nc=3, anchors=64, opset=17):
    """A graph passing (B, 4+nc, A) straight to output0: NMS can be fed made-up predictions."""
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 4 + nc, anchors])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, anchors])
    return save(tmp_path, "raw", [helper.make_node("Identity", ["raw"], ["output0"])], [x], [y], opset)


def made_up_predictions(rng, batch, nc=3, anchors=64, size=320.0):
    """Clustered boxes (so NMS has work to do) with distinct continuous scores (no ties)."""
    centres = rng.uniform(40, size - 40, size=(batch, 6, 2))
    pick = rng.integers(0, 6, size=(batch, anchors))
    cxcy = np.take_along_axis(centres, pick[..., None], 1) + rng.normal(0, 6, size=(batch, anchors, 2))
    wh = rng.uniform(20, 60, size=(batch, anchors, 2))
    scores = rng.uniform(0, 1, size=(batch, anchors, nc)) ** 3
    pred = np.concatenate([cxcy, wh, scores], -1).astype(np.float32)
    return pred.transpose(0, 2, 1).copy()  # (B, 4+nc, A)


@pytest.mark.parametrize("opset", [13, 17])
def test_onnx_nms_keeps_each_images_detections(tmp_path, opset):
    from kiln.postprocess import decode_yolo, nms_output_detections

    src = raw_yolo_graph(tmp_path, opset=opset)
    dst = tmp_path / "nms.onnx"
    nms = {"kind": "onnx", "conf_threshold": 0.05, "iou_threshold": 0.5, "max_det": 20}
    rec = surgery.run_passes(src, dst, tmp_path / "r.json", ["cleanup", "infer_shapes"], nms=nms)
    assert rec["passes"][-2]["pass"] == "nms_onnx"
    m = onnx.load(str(dst))
    assert [o.name for o in m.graph.output] == list(surgery.NMS_OUTPUTS)
    assert m.opset_import[0].version == opset
    pred = made_up_predictions(np.random.default_rng(0), 2)
    num, boxes, scores, classes = run(dst, {"raw": pred})
    assert num.shape == (2, 1) and num.dtype == np.int32 and classes.dtype == np.int32
    assert boxes.shape == (2, 20, 4) and scores.shape == (2, 20)
    got = nms_output_detections(num, boxes, scores, classes)
    want = decode_yolo(pred, 0.05, 0.5, 20)
    for g, (wb, ws, wc) in zip(got, want):
        np.testing.assert_allclose(g["boxes"], wb, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(g["scores"], ws, rtol=1e-6)
        np.testing.assert_array_equal(g["labels"], wc)
    # Two different images, two different answers, each its own (not the batch's best overall).
    assert not np.array_equal(boxes[0], boxes[1])
    alone = run(dst, {"raw": pred[1:]})
    np.testing.assert_array_equal(alone[0][0], num[1])
    np.testing.assert_allclose(alone[1][0], boxes[1], atol=1e-5)
    # Past num_detections: zeros.
    n0 = int(num[0, 0])
    if n0 < 20:
        assert not scores[0, n0:].any() and not boxes[0, n0:].any() and not classes[0, n0:].any()


def test_onnx_nms_with_no_detection(tmp_path):
    src = raw_yolo_graph(tmp_path)
    dst = tmp_path / "nms.onnx"
    surgery.run_passes(src, dst, tmp_path / "r.json", [],
                       nms={"kind": "onnx", "conf_threshold": 0.5, "iou_threshold": 0.5, "max_det": 10})
    pred = made_up_predictions(np.random.default_rng(1), 2)
    pred[:, 4:] = 0.01  # every score under the threshold
    num, boxes, scores, classes = run(dst, {"raw": pred})
    assert num.tolist() == [[0], [0]] and not boxes.any() and not scores.any() and not classes.any()


def test_efficient_nms_graph_and_tensorrt_rtx_refusal(tmp_path):
    src = raw_yolo_graph(tmp_path)
    dst = tmp_path / "eff.onnx"
    surgery.run_passes(src, dst, tmp_path / "r.json", [],
                       nms={"kind": "efficient", "conf_threshold": 0.25, "iou_threshold": 0.45, "max_det": 100})
    m = onnx.load(str(dst))
    node = next(n for n in m.graph.node if n.op_type == "EfficientNMS_TRT")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["max_output_boxes"] == 100 and attrs["box_coding"] == 0 and attrs["background_class"] == -1
    assert pytest.approx(attrs["score_threshold"]) == 0.25
    assert [o.name for o in m.graph.output] == list(surgery.NMS_OUTPUTS)
    if tensorrt_rtx.is_available():  # TensorRT-RTX has no plugin library: the table says so, the parser agrees
        ns = importer.polygraphy_trt("tensorrt-rtx")
        with pytest.raises(KilnError, match=r"EfficientNMS_TRT.*Plugin not found.*not supported by TensorRT-RTX"):
            parser.parse_onnx(ns, dst, strongly_typed=True)


def test_nms_refuses_non_yolo_graphs(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("labels", TensorProto.FLOAT, [1, 4])
    src = save(tmp_path, "other", [helper.make_node("Relu", ["x"], ["labels"])], [x], [y])
    with pytest.raises(KilnError, match=r"NMS needs a YOLO-layout graph"):
        surgery.run_passes(src, tmp_path / "o.onnx", tmp_path / "r.json", [],
                           nms={"kind": "onnx", "conf_threshold": 0.1, "iou_threshold": 0.5, "max_det": 5})
