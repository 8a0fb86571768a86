"""The ONNX stages on small models: export, simplify, surgery, inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln import batches, export, inputs, preprocess, simplify, surgery
from kiln.config import load
from kiln.errors import KilnError
from kiln.util import read_json, sha256
from tests.conftest import random_checkpoints


@pytest.fixture
def specs(config_dict, tmp_path):
    """Model specs pointing at random-weight checkpoints of the demo factories."""
    random_checkpoints(tmp_path / "y.pt", tmp_path / "r.pt")
    config_dict["models"]["yolo_demo"]["checkpoint"] = str(tmp_path / "y.pt")
    config_dict["models"]["rtdetr_demo"]["checkpoint"] = str(tmp_path / "r.pt")
    cfg = load(config_dict, check_paths=False)
    return cfg.models


def test_export_is_byte_reproducible_and_checked(specs, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export.export_onnx(specs["yolo_demo"], 17, a)
    export.export_onnx(specs["yolo_demo"], 17, b)
    assert sha256(a) == sha256(b)
    m = onnx.load(str(a))
    assert [i.name for i in m.graph.input] == ["images"] and [o.name for o in m.graph.output] == ["output0"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.opset_import[0].version == 17


def test_export_opset_decides_layernorm(specs, tmp_path):
    ops = {}
    for opset in (16, 17):
        out = tmp_path / f"r{opset}.onnx"
        export.export_onnx(specs["rtdetr_demo"], opset, out)
        m = onnx.load(str(out))
        ops[opset] = {n.op_type for n in m.graph.node}
        assert [i.name for i in m.graph.input] == ["images", "orig_target_sizes"]
        assert [o.name for o in m.graph.output] == ["labels", "boxes", "scores"]
    assert "LayerNormalization" in ops[17] and "LayerNormalization" not in ops[16]


def test_export_refuses_full_pickle(specs, tmp_path):
    from kiln.demo.models import yolo_demo

    torch.save(yolo_demo(num_classes=3), tmp_path / "full.pt")  # whole module: a pickle
    spec = replace(specs["yolo_demo"], checkpoint=str(tmp_path / "full.pt"))
    with pytest.raises(KilnError, match=r"not a weights-only state_dict.*a full pickle can run code"):
        export.export_onnx(spec, 17, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_damaged_and_mismatched_checkpoints(specs, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KilnError, match=r"checkpoint '.*bad.pt' could not be read by torch.load"):
        export.export_onnx(replace(specs["yolo_demo"], checkpoint=str(tmp_path / "bad.pt")), 17, tmp_path / "x.onnx")
    spec = replace(specs["yolo_demo"], factory_args={"num_classes": 5})
    with pytest.raises(KilnError, match=r"does not fit 'models.yolo_demo.factory'"):
        export.export_onnx(spec, 17, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_unknown_factory(specs, tmp_path):
    spec = replace(specs["yolo_demo"], factory="kiln.nothing_here:f")  # outside trusted_factories
    with pytest.raises(KilnError, match=r"'models.yolo_demo.factory': 'kiln.nothing_here:f' is not in a trusted place"):
        export.export_onnx(spec, 17, tmp_path / "x.onnx")
    spec = replace(specs["yolo_demo"], factory="kiln.demo.models:nothing_here")
    with pytest.raises(KilnError, match=r"'models.yolo_demo.factory': 'kiln.demo.models' has no function 'nothing_here'"):
        export.export_onnx(spec, 17, tmp_path / "x.onnx")


def test_simplify_disabled_copies_and_records_skip(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    src = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = simplify.simplify(src, tmp_path / "out.onnx", tmp_path / "rec.json", enabled=False)
    assert info["status"] == "skipped" and (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


def test_simplify_failure_passes_graph_on_and_says_why(tmp_path):
    """onnxsim cannot run a graph with a dangling input: the graph must pass on unchanged, with the reason."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Add", ["x", "nowhere"], ["y"])
    src = tmp_path / "dangling.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = simplify.simplify(src, tmp_path / "out.onnx", tmp_path / "rec.json")
    assert info["status"] == "failed" and "nowhere" in info["reason"]
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()
    assert read_json(tmp_path / "rec.json")["status"] == "failed"


def test_simplify_and_surgery_on_a_real_export(specs, tmp_path):
    exp = tmp_path / "e.onnx"
    export.export_onnx(specs["rtdetr_demo"], 17, exp)
    info = simplify.simplify(exp, tmp_path / "s.onnx", tmp_path / "s.json")
    assert info["status"] == "simplified" and info["nodes_out"] <= info["nodes_in"]
    rec = surgery.run_passes(tmp_path / "s.onnx", tmp_path / "g.onnx", tmp_path / "g.json",
                             list(specs["rtdetr_demo"].surgery))
    assert [p["pass"] for p in rec["passes"]] == ["input", "remove_training_nodes", "fold_constants", "cleanup",
                                                   "infer_shapes"]
    assert rec["passes"][-1]["value_infos"] > 0
    m = onnx.load(str(tmp_path / "g.onnx"))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 17
    assert [o.name for o in m.graph.output] == ["labels", "boxes", "scores"]


def test_remove_training_nodes_bypasses_dropout_and_identity(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b"]),
        helper.make_node("Sigmoid", ["b"], ["c"]),
        helper.make_node("Identity", ["c"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    onnx.save(model, str(tmp_path / "in.onnx"))
    surgery.run_passes(tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json", ["remove_training_nodes"])
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Relu", "Sigmoid"]
    assert out.graph.output[0].name == "y"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    xv = np.array([[-1.0, 0.0, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": xv})[0], 1 / (1 + np.exp(-np.maximum(xv, 0))), rtol=1e-6)


def test_letterbox_pads_and_maps_back():
    from PIL import Image

    from kiln.accuracy import _unletterbox

    img = Image.new("RGB", (200, 100), (255, 0, 0))
    arr, r, (left, top) = preprocess.letterbox(img, (256, 256))
    assert arr.shape == (256, 256, 3) and r == pytest.approx(1.28)
    assert (left, top) == (0, 64)
    assert tuple(arr[0, 0]) == (114, 114, 114) and tuple(arr[128, 128]) == (255, 0, 0)
    box = np.array([[0, 64, 256, 192]], dtype=np.float32)  # the whole image in input pixels
    back = _unletterbox(box, r, np.array([left, top]), np.array([200, 100]))
    np.testing.assert_allclose(back, [[0, 0, 200, 100]], atol=1e-4)


def test_preprocess_split_stores_uint8_and_rtdetr_sizes(specs, tmp_path):
    from kiln.demo.shapes import generate_split

    ann = generate_split(tmp_path / "val", "val", 3, seed=0, image_size=256)
    out = tmp_path / "in.npz"
    inputs.preprocess_split(specs["rtdetr_demo"], ann, 3, out)
    data = batches.load(out)
    assert data.images.dtype == np.uint8 and data.images.shape == (3, 3, 256, 256)
    ids = sorted(im["id"] for im in json.loads(ann.read_text())["images"])
    assert list(data.image_ids) == ids
    feeds = data.feeds(specs["rtdetr_demo"], 0, 2)
    assert feeds["images"].dtype == np.float32 and feeds["images"].max() <= 1.0
    assert feeds["orig_target_sizes"].tolist() == [[256, 256], [256, 256]]
    with pytest.raises(KilnError, match="has 3 images but 5 are needed"):
        inputs.preprocess_split(specs["rtdetr_demo"], ann, 5, tmp_path / "x.npz")
