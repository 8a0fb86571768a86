"""Fast checks of the bundled demo: dataset, models, export traits, post-processing, mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln.demo.models import rtdetr_demo, yolo_demo
from kiln.demo.shapes import CLASS_NAMES, generate_split
from kiln.metrics import coco_map
from kiln.postprocess import batched_nms, nms, rtdetr_detections, scale_boxes_letterbox, yolo_detections

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- dataset
def test_generate_split_is_byte_identical(tmp_path: Path) -> None:
    a = generate_split(tmp_path / "a", "val", 4, seed=0)
    b = generate_split(tmp_path / "b", "val", 4, seed=0)
    assert a.name == b.name == "annotations.json"
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) == {"annotations.json"} | {f"images/val_{i:06d}.png" for i in range(4)}
    assert fa == fb


def test_splits_and_seeds_differ(tmp_path: Path) -> None:
    generate_split(tmp_path / "val", "val", 2, seed=0)
    generate_split(tmp_path / "calib", "calib", 2, seed=0)
    generate_split(tmp_path / "val1", "val", 2, seed=1)
    v = (tmp_path / "val/images/val_000000.png").read_bytes()
    assert v != (tmp_path / "calib/images/calib_000000.png").read_bytes()
    assert v != (tmp_path / "val1/images/val_000000.png").read_bytes()


def test_annotations_are_valid_coco(tmp_path: Path) -> None:
    size = 192
    ann = json.loads(generate_split(tmp_path, "train", 20, seed=3, image_size=size).read_text())
    assert [c["id"] for c in ann["categories"]] == [1, 2, 3]
    assert [c["name"] for c in ann["categories"]] == list(CLASS_NAMES)
    image_ids = {im["id"] for im in ann["images"]}
    assert len(image_ids) == 20
    assert all(im["width"] == size and im["height"] == size for im in ann["images"])
    assert len({a["id"] for a in ann["annotations"]}) == len(ann["annotations"])
    per_image: dict[int, int] = {}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["image_id"] in image_ids and a["category_id"] in (1, 2, 3) and a["iscrowd"] == 0
        assert w > 0 and h > 0 and a["area"] > 0
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert set(per_image) == image_ids  # every image has at least one object
    assert max(per_image.values()) <= 6


# --------------------------------------------------------------------------- models
def test_yolo_output_layout() -> None:
    torch.manual_seed(0)
    m = yolo_demo(num_classes=3)
    with torch.no_grad():
        out = m(torch.rand(2, 3, 128, 128))
        assert out.shape == (2, 7, 16 * 16 + 8 * 8 + 4 * 4) and out.dtype == torch.float32
        assert bool(((out[:, 4:] >= 0) & (out[:, 4:] <= 1)).all())
        assert bool((out[:, 2:4] > 0).all())  # widths/heights positive
        wide = m(torch.rand(1, 3, 128, 192))  # non-square, H and W divisible by 32
        assert wide.shape == (1, 7, 16 * 24 + 8 * 12 + 4 * 6)


def test_rtdetr_output_layout_and_scaling() -> None:
    torch.manual_seed(0)
    m = rtdetr_demo(num_classes=3, num_queries=50, num_top_queries=40)
    x = torch.rand(2, 3, 128, 128)  # 8*8 + 4*4 = 80 tokens >= 50 queries
    sizes = torch.tensor([[640, 480], [256, 256]], dtype=torch.int64)
    with torch.no_grad():
        labels, boxes, scores = m(x, sizes)
        _, unit_boxes, _ = m(x, torch.ones(2, 2, dtype=torch.int64))
    assert labels.shape == (2, 40) and labels.dtype == torch.int64
    assert boxes.shape == (2, 40, 4) and boxes.dtype == torch.float32
    assert scores.shape == (2, 40) and scores.dtype == torch.float32
    assert bool(((labels >= 0) & (labels < 3)).all())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # top-k is sorted
    # Boxes are normalised xyxy scaled by (w, h, w, h) of orig_target_sizes.
    scale = sizes.repeat(1, 2).unsqueeze(1).float()
    torch.testing.assert_close(boxes, unit_boxes * scale)


def _export(
    model: torch.nn.Module, args: tuple, path: Path, opset: int, names: list[str], outputs: list[str]
) -> onnx.ModelProto:
    dyn = {n: {0: "batch"} for n in names + outputs}
    torch.onnx.export(
        model,
        args,
        str(path),
        opset_version=opset,
        dynamo=False,
        input_names=names,
        output_names=outputs,
        dynamic_axes=dyn,
    )
    return onnx.load(str(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rtdetr_onnx_has_mod_and_layernorm_only_at_opset17(tmp_path: Path) -> None:
    m = rtdetr_demo(num_queries=30, num_top_queries=20)
    args = (torch.rand(1, 3, 128, 128), torch.tensor([[128, 128]], dtype=torch.int64))
    ops17 = {
        n.op_type
        for n in _export(
            m, args, tmp_path / "r17.onnx", 17, ["images", "orig_target_sizes"], ["labels", "boxes", "scores"]
        ).graph.node
    }
    ops16 = {
        n.op_type
        for n in _export(
            m, args, tmp_path / "r16.onnx", 16, ["images", "orig_target_sizes"], ["labels", "boxes", "scores"]
        ).graph.node
    }
    assert "Mod" in ops17 and "Mod" in ops16
    assert "LayerNormalization" in ops17
    assert "LayerNormalization" not in ops16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_yolo_onnx_dynamic_batch_matches_torch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = yolo_demo()
    _export(m, (torch.rand(1, 3, 128, 128),), tmp_path / "y.onnx", 17, ["images"], ["output0"])
    x = torch.rand(2, 3, 128, 128)
    sess = ort.InferenceSession(str(tmp_path / "y.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = m(x).numpy()
    assert got.shape == want.shape == (2, 7, 16 * 16 + 8 * 8 + 4 * 4)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- post-processing
def test_nms_suppresses_same_class_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, 0.6).tolist() == [0, 3]  # class-agnostic: 1 and 2 overlap 0 (IoU 0.68)
    assert batched_nms(boxes, scores, labels, 0.6).tolist() == [0, 2, 3]
    assert batched_nms(boxes, scores, labels, 0.7).tolist() == [0, 1, 2, 3]  # IoU 0.68 < 0.7
    assert batched_nms(boxes, scores, labels, 0.6, max_det=2).tolist() == [0, 2]


def test_yolo_detections_decodes_and_nms() -> None:
    # (B=1, 4 + 2 classes, A=4) in the Ultralytics layout: cx, cy, w, h, class scores.
    cxcywh = np.array([[5, 5, 10, 10], [6, 6, 10, 10], [6, 6, 10, 10], [55, 55, 10, 10]], np.float32)
    cls = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.6, 0.0005]], np.float32)
    out = np.concatenate([cxcywh, cls], 1).T[None]
    (det,) = yolo_detections(out, conf_thres=0.001, iou_thres=0.6, max_det=300)
    np.testing.assert_allclose(det["scores"], [0.9, 0.7, 0.6])
    assert det["labels"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(det["boxes"], [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    assert det["boxes"].dtype == np.float32
    (none,) = yolo_detections(out, conf_thres=0.95)
    assert none["boxes"].shape == (0, 4) and none["labels"].shape == (0,)


def test_rtdetr_detections_filters_and_sorts() -> None:
    labels = np.array([[2, 0, 1]])
    boxes = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    scores = np.array([[0.3, 0.0005, 0.8]], np.float32)
    (det,) = rtdetr_detections(labels, boxes, scores, conf_thres=0.001)
    assert det["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(det["scores"], [0.8, 0.3])
    np.testing.assert_allclose(det["boxes"], boxes[0, [2, 0]])


def test_scale_boxes_letterbox() -> None:
    # 640x480 image letterboxed into 320x320: ratio 0.5, pad (0, 40).
    b = scale_boxes_letterbox(np.array([[10, 50, 110, 150]]), 0.5, (0, 40), orig_shape=(480, 640))
    np.testing.assert_allclose(b, [[20, 20, 220, 220]])
    clipped = scale_boxes_letterbox(np.array([[-10, 30, 400, 400]]), 0.5, (0, 40), orig_shape=(480, 640))
    np.testing.assert_allclose(clipped, [[0, 0, 640, 480]])


# --------------------------------------------------------------------------- metrics
def test_coco_map_perfect_and_empty(tmp_path: Path) -> None:
    ann_path = generate_split(tmp_path, "val", 5, seed=0)
    ann = json.loads(ann_path.read_text())
    cat_ids = [c["id"] for c in ann["categories"]]
    ids = [im["id"] for im in ann["images"]]
    dets = []
    for i in ids:
        anns = [a for a in ann["annotations"] if a["image_id"] == i]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        dets.append(
            {
                "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "scores": np.ones(len(anns), np.float32),
                "labels": np.array([cat_ids.index(a["category_id"]) for a in anns]),
            }
        )
    perfect = coco_map(ann_path, ids, dets, cat_ids)
    assert perfect["map50"] == pytest.approx(1.0) and perfect["map50_95"] == pytest.approx(1.0)
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)} for _ in ids]
    assert coco_map(ann_path, ids, empty, cat_ids) == {"map50_95": 0.0, "map50": 0.0}


# --------------------------------------------------------------------------- committed checkpoints
@pytest.mark.parametrize("name,factory", [("yolo", yolo_demo), ("rtdetr", rtdetr_demo)])
def test_committed_checkpoint_loads(name: str, factory) -> None:
    ckpt = MODELS / f"demo_{name}.pt"
    manifest = MODELS / "demo_models.json"
    if not ckpt.exists() or not manifest.exists():
        pytest.skip(f"{ckpt.relative_to(REPO)} or demo_models.json not present (run scripts/train_demo.py)")
    entry = json.loads(manifest.read_text())["models"][name]
    assert ckpt.stat().st_size < 5_000_000
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # The workflow's config passes only num_classes, so the factory defaults must match too.
    factory(num_classes=entry["factory_args"]["num_classes"]).load_state_dict(state, strict=True)
    model = factory(**entry["factory_args"])
    model.load_state_dict(state, strict=True)
    model.eval()
    h, w = entry["input_size"]
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        out = model(x) if name == "yolo" else model(x, torch.tensor([[w, h]]))
    assert all(torch.isfinite(t.float()).all() for t in (out if isinstance(out, tuple) else (out,)))
    assert 0.0 <= entry["val_metrics"]["map50"] <= 1.0
