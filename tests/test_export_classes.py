"""The class count the exported graph implies: checked against the config and checkpoint at export, recorded
in the ONNX's metadata where nothing states it, and checked against the dataset by the reference stage."""

from __future__ import annotations

import json
import textwrap

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln import accuracy, classes, export
from kiln.config import load
from kiln.errors import KilnError
from tests.conftest import random_checkpoints, tiny_config

# Tiny detectors of both layouts whose state_dict keys are no head Kiln knows (kiln.sources.head_classes),
# so only factory_args (or nothing) state their class count.
NETS = '''
import torch
from torch import nn


class TinyYolo(nn.Module):
    """(B, 4 + nc + extra, A): ``extra`` > 0 is a head the yolo layout does not describe (YOLOv5's objectness)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1)

    def forward(self, images):
        return self.conv(images[:, :, ::32, ::32]).flatten(2)


class TinyDetr(nn.Module):
    """RT-DETR's deploy outputs; labels = index % divisor over the flattened (queries x classes) scores."""

    def __init__(self, num_classes, divisor):
        super().__init__()
        self.score = nn.Linear(3, num_classes)
        self.box = nn.Linear(3, 4)
        self.divisor = divisor

    def forward(self, images, orig_target_sizes):
        tokens = images.flatten(2).transpose(1, 2)[:, :10]
        scores, index = self.score(tokens).sigmoid().flatten(1).topk(5, dim=1)
        labels = index % self.divisor
        boxes = self.box(tokens).gather(1, (index // self.divisor).unsqueeze(-1).repeat(1, 1, 4))
        return labels, boxes * orig_target_sizes.repeat(1, 2).unsqueeze(1), scores


def yolo(num_classes=3, extra=0):
    return TinyYolo(4 + num_classes + extra).eval()


def detr(num_classes=3, background=0):
    return TinyDetr(num_classes, num_classes + background).eval()
'''


@pytest.fixture
def models(tmp_path):
    """Model specs of the tiny detectors (and the demo RT-DETR), checkpoints of their random weights."""
    nets = tmp_path / "nets"
    nets.mkdir()
    (nets / "kiln_classes_nets.py").write_text(textwrap.dedent(NETS))
    raw = tiny_config()
    raw["trusted_factories"] = {"folders": ["nets"]}
    factories = {"yolo_derived": ("yolo", {}, "yolo"), "yolo_objectness": ("yolo", {"num_classes": 3, "extra": 1}, "yolo"),
                 "detr_derived": ("detr", {}, "rtdetr"), "detr_background": ("detr", {"num_classes": 3, "background": 1},
                                                                             "rtdetr")}
    import importlib
    import sys

    sys.path.insert(0, str(nets))
    try:
        module = importlib.import_module("kiln_classes_nets")
        for name, (fn, args, layout) in factories.items():
            torch.save(getattr(module, fn)(**args).state_dict(), tmp_path / f"{name}.pt")
            raw["models"][name] = {"source": "torch", "factory": f"kiln_classes_nets:{fn}", "factory_args": args,
                                   "checkpoint": str(tmp_path / f"{name}.pt"), "layout": layout, "dataset": "demo",
                                   "input_size": [64, 64], "calibration": {"images": 8}}
    finally:
        sys.path.remove(str(nets))
        sys.modules.pop("kiln_classes_nets", None)
    random_checkpoints(tmp_path / "y.pt", tmp_path / "r.pt")
    raw["models"]["yolo_demo"]["checkpoint"] = str(tmp_path / "y.pt")
    raw["models"]["rtdetr_demo"]["checkpoint"] = str(tmp_path / "r.pt")
    return load(raw, base=tmp_path).models


def meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".onnx")


def test_yolo_count_stated_nowhere_is_derived_from_the_output_shape(models, tmp_path):
    out = tmp_path / "onnx" / "y.onnx"
    record = export.export_onnx(models["yolo_derived"], 17, out)
    got = meta(out)
    assert got[classes.COUNT_KEY] == "3"
    assert got[classes.FROM_KEY] == (
        "output shape (ONNX shape inference): output0 dim 1 = 4 + nc = 7; stated nowhere else: derived")
    assert record["classes"] == {"count": 3, "how": got[classes.FROM_KEY], "stated": []}


def test_yolo_mismatch_is_refused_and_leaves_no_onnx(models, tmp_path):
    out = tmp_path / "onnx" / "y.onnx"
    with pytest.raises(KilnError) as err:
        export.export_onnx(models["yolo_objectness"], 17, out)
    assert str(err.value) == (
        f"export of 'models.yolo_objectness' to '{out}': the exported graph has 4 classes (output shape (ONNX "
        f"shape inference): output0 dim 1 = 4 + nc = 8) but 'models.yolo_objectness.factory_args.num_classes' states 3: set "
        f"'models.yolo_objectness.factory_args.num_classes: 4' if the model has 4 classes, or make the factory "
        f"build the head it is given"
    )
    assert leftovers(out.parent) == []


def test_rtdetr_count_is_read_from_the_postprocessors_mod(models, tmp_path):
    derived = export.export_onnx(models["detr_derived"], 17, tmp_path / "d.onnx")
    assert derived["classes"]["count"] == 3 and derived["classes"]["stated"] == []
    assert meta(tmp_path / "d.onnx")[classes.FROM_KEY] == (
        "graph: labels (B, K) = index mod nc = 3; stated nowhere else: derived")
    # The demo RT-DETR: its checkpoint's score heads state 3, the graph agrees.
    demo = export.export_onnx(models["rtdetr_demo"], 17, tmp_path / "r.onnx")
    assert demo["classes"]["count"] == 3
    assert [s["count"] for s in demo["classes"]["stated"]] == [3]
    assert "enc_score_head" in demo["classes"]["stated"][0]["where"] or "dec_score_head" in \
        demo["classes"]["stated"][0]["where"]
    assert meta(tmp_path / "r.onnx")[classes.FROM_KEY].endswith("; as the config or checkpoint states")


def test_rtdetr_mismatch_is_refused_and_leaves_no_onnx(models, tmp_path):
    out = tmp_path / "onnx" / "d.onnx"
    with pytest.raises(KilnError, match=(
            r"^export of 'models.detr_background' to '.*d.onnx': the exported graph has 4 classes \(graph: labels "
            r"\(B, K\) = index mod nc = 4\) but 'models.detr_background.factory_args.num_classes' states 3: set "
            r"'models.detr_background.factory_args.num_classes: 4'")):
        export.export_onnx(models["detr_background"], 17, out)
    assert leftovers(out.parent) == []


def test_ultralytics_rtdetr_class_column_is_read_from_the_written_out_remainder(tmp_path):
    """Ultralytics' RTDETRDecoder.postprocess: class = index - floor(index / nc) * nc, the last column of (B, K, 6)."""

    class Decoder(torch.nn.Module):
        def forward(self, images):
            scores, index = images.flatten(2).transpose(1, 2).flatten(1).topk(10, dim=1)  # (B, HW x 3) "scores"
            query = torch.div(index, 3, rounding_mode="floor")
            boxes = torch.zeros_like(scores).unsqueeze(-1).expand(-1, -1, 4) + query.unsqueeze(-1)
            return torch.cat([boxes, scores[..., None], (index - query * 3)[..., None].float()], -1)

    torch.onnx.export(Decoder(), (torch.rand(1, 3, 8, 8),), str(tmp_path / "u.onnx"), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    found = classes.graph_classes(onnx.load(str(tmp_path / "u.onnx")), "ultralytics_rtdetr")
    assert found == classes.GraphClasses(3, "graph: output0 (B, K, 6) class column = index mod nc = 3")

    class Argmax(torch.nn.Module):  # older Ultralytics: best class per query, no index mod nc
        def forward(self, images):
            scores = images.flatten(2).transpose(1, 2)  # (B, Q, nc)
            best, cls = scores.max(-1)
            return torch.cat([scores[..., :1].expand(-1, -1, 4), best[..., None], cls[..., None].float()], -1)

    torch.onnx.export(Argmax(), (torch.rand(1, 3, 8, 8),), str(tmp_path / "a.onnx"), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    assert classes.graph_classes(onnx.load(str(tmp_path / "a.onnx")), "ultralytics_rtdetr") == classes.GraphClasses(
        None, "output0's class index is not computed as index mod a constant nc: the class count cannot be read "
              "from the graph")


def _symbolic_yolo():
    """output0 reshaped to a shape given at run time: no inference can read its dimension 1."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [3])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", "channels", "anchors"])
    node = helper.make_node("Reshape", ["images", "shape"], ["output0"])
    return helper.make_model(helper.make_graph([node], "g", [x, shape], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_symbolic_class_dimension_is_said_not_guessed(models, tmp_path):
    model = _symbolic_yolo()
    found = classes.graph_classes(model, "yolo")
    assert found == classes.GraphClasses(
        None, "output0 dim 1 (4 + nc) is symbolic ('channels') even after ONNX shape inference: the class count "
              "cannot be read")
    nothing = export.check_classes(models["yolo_derived"], model, {}, tmp_path / "x.onnx")
    assert nothing["metadata"] == {classes.FROM_KEY: f"unknown: {found.how}"}
    assert nothing["record"]["count"] is None
    stated = export.check_classes(models["yolo_objectness"], model, {}, tmp_path / "x.onnx")
    assert stated["metadata"] == {classes.COUNT_KEY: "3", classes.FROM_KEY: (
        f"stated by the config or checkpoint; not readable from the graph: {found.how}")}


def test_names_that_disagree_with_the_graph_are_refused(models, tmp_path):
    export.export_onnx(models["yolo_derived"], 17, tmp_path / "y.onnx")
    model = onnx.load(str(tmp_path / "y.onnx"))
    with pytest.raises(KilnError, match=(
            r"the exported graph has 3 classes \(.*\) but the model's names \(\{0: 'a', 1: 'b'\}\) states 2: give "
            r"the model \(its 'names'\) one name per class, 3$")):
        export.check_classes(models["yolo_derived"], model, {"names": "{0: 'a', 1: 'b'}"}, tmp_path / "y.onnx")


def test_reference_refuses_a_derived_count_that_is_not_the_datasets(models, tmp_path):
    """The count reaches the reference stage's input (simplify and surgery keep the metadata) and is checked there."""
    from kiln import simplify, surgery

    export.export_onnx(models["yolo_derived"], 17, tmp_path / "e.onnx")
    simplify.simplify(tmp_path / "e.onnx", tmp_path / "s.onnx", tmp_path / "s.json")
    out = tmp_path / "y.onnx"
    surgery.run_passes(tmp_path / "s.onnx", out, tmp_path / "g.json", [])
    assert classes.recorded(onnx.load(str(out))) == 3
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}))
    accuracy.check_classes(models["yolo_derived"], out, annotations)  # 3 and 3: passes
    annotations.write_text(json.dumps({"categories": [{"id": i, "name": f"c{i}"} for i in (1, 2)]}))
    with pytest.raises(KilnError) as err:
        accuracy.check_classes(models["yolo_derived"], out, annotations)
    assert str(err.value) == (
        f"'{out}' of 'models.yolo_derived' outputs 3 classes (output shape (ONNX shape inference): output0 dim 1 "
        f"= 4 + nc = 7; stated nowhere else: derived) but its dataset 'demo' has 2 categories ('{annotations}'), so its mAP would mean "
        f"nothing: give the model a head of 2 classes, or point 'models.yolo_derived.dataset' at the dataset it "
        f"was trained on"
    )
