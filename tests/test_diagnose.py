"""The diagnose stage: a model TensorRT-RTX refuses, reduced by Polygraphy to its failing node, with a hint.

TensorRT-RTX's parser and ahead-of-time builder run on this CPU-only host, so both failure kinds are
real here: a parser refusal (the Det op) and a builder refusal (NonMaxSuppression, which the parser
takes but the builder cannot implement). TensorRT (non-RTX) failures go through the same code but
cannot be run here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import tiny_config
from onnx import TensorProto, helper

from kiln import diagnose, paths, summary, surgery
from kiln.backends import tensorrt_rtx
from kiln.config import load
from kiln.util import write_json

needs_rtx = pytest.mark.skipif(not tensorrt_rtx.is_available(), reason="TensorRT-RTX is not installed")


def rtx_config():
    raw = tiny_config()
    raw["devices"] = {"rtx": {"backend": "tensorrt-rtx", "compute_capability": "8.9", "precisions": ["fp32"],
                              "builder_optimization_level": 0, "batch_sizes": [1], "models": ["yolo_demo"]}}
    return load(raw, check_paths=False)


@pytest.fixture
def det_model(tmp_path):
    """Conv -> Relu -> Slice -> Det -> Sigmoid: ONNX Runtime runs it, TensorRT-RTX's parser has no Det."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 3, 3],
                           np.random.default_rng(0).normal(size=81).astype(np.float32))
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="/backbone/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/backbone/relu"),
             helper.make_node("Slice", ["r", "s0", "s1", "ax"], ["sq"], name="/head/crop"),
             helper.make_node("Det", ["sq"], ["d"], name="/head/det"),
             helper.make_node("Sigmoid", ["d"], ["output0"], name="/head/sigmoid")]
    inits = [w, helper.make_tensor("s0", TensorProto.INT64, [2], [0, 0]),
             helper.make_tensor("s1", TensorProto.INT64, [2], [3, 3]),
             helper.make_tensor("ax", TensorProto.INT64, [2], [2, 3])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "det.onnx"
    onnx.save(model, str(path))
    return path


@needs_rtx
def test_parser_failure_reduced_to_the_failing_node(det_model, tmp_path):
    device = rtx_config().devices["rtx"]
    out = tmp_path / "diag" / "diagnosis.json"
    rec = diagnose.diagnose(det_model, device, "fp32", out)
    assert rec["status"] == "diagnosed" and rec["stage"] == "parse"
    assert rec["reduced_nodes"] == [{"name": "/head/det", "op": "Det"}]  # four of the five nodes cut away
    assert rec["failing_nodes"] == [{"name": "/head/det", "op": "Det"}]
    assert rec["hint"].startswith("Det at /head/det is not supported by TensorRT-RTX 1.7")
    assert "UNSUPPORTED_NODE" in rec["reduced_error"]
    assert rec["reduce_iterations"]["bisect"] > 0
    reduced = onnx.load(str(tmp_path / "diag" / "reduced.onnx"))
    assert [n.op_type for n in reduced.graph.node] == ["Det"]
    assert json.loads(out.read_text())["hint"] == rec["hint"]


@needs_rtx
def test_builder_failure_reduced_to_the_failing_node(tmp_path):
    """NonMaxSuppression parses on TensorRT-RTX 1.7 but its builder has no implementation of it."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 7, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 7, 64])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    raw = helper.make_model(helper.make_graph([helper.make_node("Mul", ["images", "two"], ["output0"], name="/head/mul")],
                                              "g", [x], [y], initializer=[two]),
                            opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(raw, str(tmp_path / "raw.onnx"))
    surgery.run_passes(tmp_path / "raw.onnx", tmp_path / "nms.onnx", tmp_path / "s.json", ["infer_shapes"],
                       nms={"kind": "onnx", "conf_threshold": 0.1, "iou_threshold": 0.5, "max_det": 10})
    rec = diagnose.diagnose(tmp_path / "nms.onnx", rtx_config().devices["rtx"], "fp32", tmp_path / "d" / "diagnosis.json")
    assert rec["status"] == "diagnosed" and rec["stage"] == "build"
    assert "has no runners that implement it" in rec["error"]
    assert rec["failing_nodes"] == [{"name": "nms/NonMaxSuppression", "op": "NonMaxSuppression"}]
    assert len(rec["reduced_nodes"]) < 5
    assert "NonMaxSuppression at nms/NonMaxSuppression is not supported by TensorRT-RTX 1.7" in rec["hint"]
    assert "nms: none" in rec["hint"]


def test_built_engine_needs_no_diagnosis_and_summary_shows_one(tmp_path):
    cfg = rtx_config()
    rec = tmp_path / "engine.json"
    write_json(rec, {"status": "built"})
    out = tmp_path / "d.json"
    assert diagnose.run_rule(cfg, "rtx", "yolo_demo", "fp32", rec, tmp_path / "none.onnx", out)["status"] == "not needed"
    # A failed build with its diagnosis: the summary row carries the hint.
    R = cfg.results
    f = {k: tmp_path / paths.fmt(p, results=R, device="rtx", model="yolo_demo", precision="fp32")
         for k, p in (("engine", paths.ENGINE_RECORD), ("diag", paths.DIAGNOSIS))}
    write_json(f["engine"], {"status": "failed", "reason": "TensorRT-RTX 1.7.1.116 cannot parse ..."})
    write_json(f["diag"], {"status": "diagnosed", "hint": "Det at /head/det is not supported by TensorRT-RTX 1.7: x",
                           "failing_nodes": [{"name": "/head/det", "op": "Det"}], "reduced_onnx": "r.onnx"})
    local = {paths.fmt(p, results=R, device="rtx", model="yolo_demo", precision="fp32"): str(f[k])
             for k, p in (("engine", paths.ENGINE_RECORD), ("diag", paths.DIAGNOSIS))}
    row = summary._row(cfg, "rtx", "yolo_demo", "fp32", None, "no GPU here", local=lambda p: local.get(p, p))
    assert row["status"] == "failed" and row["reason"].startswith("build failed: TensorRT-RTX")
    assert row["diagnosis"].startswith("Det at /head/det is not supported by TensorRT-RTX 1.7: x [failing subgraph: Det")


def test_device_round_trips_for_the_check_process():
    device = rtx_config().devices["rtx"]
    assert diagnose.device_from_json(diagnose.device_json(device)) == device
