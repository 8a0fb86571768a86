"""The diagnose stage: a model TensorRT-RTX refuses, reduced by Polygraphy to its failing node, with a hint.

TensorRT-RTX's parser and ahead-of-time builder run on this CPU-only host, so both failure kinds are
real here: a parser refusal (the Det op) and a builder refusal (NonMaxSuppression, which the parser
takes but the builder cannot implement), and a custom-domain op that neither TensorRT-RTX nor ONNX
Runtime has (com.example:Foo). TensorRT (non-RTX) failures go through the same code but cannot be
run here.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import onnx
import pytest
from conftest import tiny_config
from onnx import TensorProto, helper

from kiln import diagnose as diagnose_stage
from kiln import paths, summary, surgery
from kiln.backends import tensorrt_rtx
from kiln.backends.trt import diagnose
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


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """The system temporary folder, empty, for this test and the processes it starts: nothing may be left in it."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def foo_model(tmp_path):
    """images -> Relu -> com.example:Foo -> Sigmoid: TensorRT-RTX has no plugin for Foo, ONNX Runtime no kernel."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3, 8, 8])
    nodes = [helper.make_node("Relu", ["images"], ["r"], name="/backbone/relu"),
             helper.make_node("Foo", ["r"], ["f"], name="/Foo", domain="com.example"),
             helper.make_node("Sigmoid", ["f"], ["output0"], name="/head/sigmoid")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "foo.onnx"
    onnx.save(model, str(path))
    return path


@needs_rtx
def test_parser_failure_reduced_to_the_failing_node(det_model, tmp_path, system_tmp):
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
    assert sorted(p.name for p in out.parent.iterdir()) == ["diagnosis.json", "reduced.onnx"]  # scratch removed
    assert list(system_tmp.iterdir()) == []  # Polygraphy's temporaries went to the scratch folder


@needs_rtx
def test_custom_domain_op_named_straight_from_the_parser(foo_model, tmp_path, system_tmp):
    """ONNX Runtime cannot run com.example:Foo, so no reduction could work: the graph and the parser name it."""
    out = tmp_path / "diag" / "diagnosis.json"
    rec = diagnose.diagnose(foo_model, rtx_config().devices["rtx"], "fp32", out)
    assert rec["status"] == "diagnosed" and rec["stage"] == "parse"
    assert rec["failing_nodes"] == rec["reduced_nodes"] == [{"name": "/Foo", "op": "com.example:Foo"}]
    assert rec["hint"] == (
        "node 1 '/Foo' (op com.example:Foo): custom-domain op with no kernel/plugin: TensorRT-RTX 1.7 has no plugin "
        "for it and ONNX Runtime no kernel: register a TensorRT plugin for com.example:Foo on this device (and an "
        "ONNX Runtime custom-op library for validation), or replace it with standard ONNX ops in the export or a "
        "surgery pass, or build this model for another device")
    assert "Plugin not found" in rec["reduced_error"] and str(out.parent / "reduced.onnx") in rec["reduced_error"]
    assert "reduce_iterations" not in rec  # nothing reduced: the graph says it
    reduced = onnx.load(str(out.parent / "reduced.onnx"))
    assert [(n.domain, n.op_type) for n in reduced.graph.node] == [("com.example", "Foo")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["diagnosis.json", "reduced.onnx"]
    assert list(system_tmp.iterdir()) == []


def test_unknown_ops_are_those_neither_onnx_nor_onnx_runtime_define(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Gelu", ["a"], ["b"], name="ort_gelu", domain="com.microsoft"),  # an ORT kernel
             helper.make_node("Swish", ["b"], ["c"], name="local", domain="my.functions"),  # the model's function
             helper.make_node("Foo", ["c"], ["d"], name="made_up"),  # default domain, not in ONNX
             helper.make_node("Foo", ["d"], ["y"], name="custom", domain="com.example")]
    swish = helper.make_function("my.functions", "Swish", ["i"], ["o"],
                                 [helper.make_node("Sigmoid", ["i"], ["s"]), helper.make_node("Mul", ["i", "s"], ["o"])],
                                 [helper.make_opsetid("", 17)])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), functions=[swish], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                             helper.make_opsetid("my.functions", 1),
                                             helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert diagnose.unknown_ops(tmp_path / "m.onnx") == [
        {"index": 3, "name": "made_up", "op": "Foo", "custom": False},
        {"index": 4, "name": "custom", "op": "com.example:Foo", "custom": True}]


@needs_rtx
def test_a_diagnosis_that_cannot_run_says_why_in_one_line(det_model, tmp_path, system_tmp, monkeypatch):
    """A Polygraphy step that dies with a traceback: the record's reason and the summary row are one line."""
    crash = "def sanitize():\n    raise RuntimeError('sanitize exploded')\nsanitize()"
    monkeypatch.setattr(diagnose, "_polygraphy", lambda: [sys.executable, "-c", crash])
    cfg = rtx_config()
    R = cfg.results
    f = {k: tmp_path / paths.fmt(p, results=R, device="rtx", model="yolo_demo", precision="fp32")
         for k, p in (("engine", paths.ENGINE_RECORD), ("diag", paths.DIAGNOSIS))}
    write_json(f["engine"], {"status": "failed", "reason": "TensorRT-RTX 1.7.1.116 cannot parse ..."})
    rec = diagnose_stage.diagnose_build(cfg, "rtx", "yolo_demo", "fp32", f["engine"], det_model, f["diag"])
    assert rec["status"] == "failed"
    assert rec["reason"] == "diagnose: polygraphy surgeon sanitize failed (exit 1): RuntimeError: sanitize exploded"
    local = {paths.fmt(p, results=R, device="rtx", model="yolo_demo", precision="fp32"): str(f[k])
             for k, p in (("engine", paths.ENGINE_RECORD), ("diag", paths.DIAGNOSIS))}
    row = summary._row(cfg, "rtx", "yolo_demo", "fp32", None, "no GPU here", local=lambda p: local.get(p, p))
    assert row["diagnosis"] == f"not diagnosed: {rec['reason']}"
    assert sorted(p.name for p in f["diag"].parent.iterdir()) == ["diagnosis.json"]
    assert list(system_tmp.iterdir()) == []


def test_tool_output_becomes_its_one_line_reason():
    traceback = """[I] Loading model
Traceback (most recent call last):
  File "/venv/bin/polygraphy", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/venv/lib/python3.11/site-packages/onnxruntime/capi/onnxruntime_inference_collection.py", line 755, in x
    sess = C.InferenceSession(session_options, self._model_bytes, False, self._read_config_from_model)
onnxruntime.capi.onnxruntime_pybind11_state.Fail: [ONNXRuntimeError] : 1 : FAIL : Fatal error: com.example:Foo(-1) is not a registered function/op
"""
    assert diagnose._one_line(traceback) == ("onnxruntime.capi.onnxruntime_pybind11_state.Fail: [ONNXRuntimeError] : 1 : "
                                             "FAIL : Fatal error: com.example:Foo(-1) is not a registered function/op")
    assert diagnose._one_line("[I] start\n[!] Could not load   the model\n[I] done") == "Could not load the model"


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
    assert diagnose_stage.diagnose_build(cfg, "rtx", "yolo_demo", "fp32", rec, tmp_path / "none.onnx", out)["status"] == "not needed"
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


def test_diagnosis_records_the_builds_tf32_and_the_suggestion_the_summary_hint_quotes(tmp_path):
    from kiln import findings
    from kiln.util import read_json

    cfg = rtx_config()
    rec, out = tmp_path / "engine.json", tmp_path / "d.json"
    write_json(rec, {"status": "built", "options": {"tf32": True}})
    got = diagnose_stage.diagnose_build(cfg, "rtx", "yolo_demo", "fp16", rec, tmp_path / "none.onnx", out)
    assert read_json(out) == got and got["status"] == "not needed" and got["tf32"] is True
    assert got["suggestion"].endswith("set devices.rtx.tf32: false and rebuild")
    failing = {"model": "yolo_demo", "device": "rtx", "precision": "fp16", "status": "failed"}
    assert findings.tf32_hint(failing, read_json(rec)) == got["suggestion"]  # one implementation, two places
    write_json(rec, {"status": "built", "options": {"tf32": False}})
    got = diagnose_stage.diagnose_build(cfg, "rtx", "yolo_demo", "fp32", rec, tmp_path / "none.onnx", out)
    assert got["tf32"] is False and got["suggestion"] is None
    write_json(rec, {"status": "built", "options": {"tf32": True}})
    got = diagnose_stage.diagnose_build(cfg, "rtx", "yolo_demo", "int8", rec, tmp_path / "none.onnx", out)
    assert "tf32" not in got  # TF32 does not touch int8 layers: not recorded
