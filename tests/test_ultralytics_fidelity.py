"""Kiln's mAP of an Ultralytics-trained YOLOv8n against Ultralytics' own validator on the same images.

models/ultralytics_demo.pt was trained by Ultralytics' trainer on the demo shapes data
(scripts/train_ultralytics_demo.py); models/ultralytics_demo.json holds the figures Ultralytics'
validator gave it then, with conf 0.001, iou 0.7, max_det 300 at imgsz 256. Here Kiln exports it
(source ultralytics, its defaults: Ultralytics' letterbox and NMS IoU), runs the ONNX on ONNX Runtime
over the same validation images and scores it with pycocotools. Ultralytics' figure of the same
square letterbox (``validator_square``: rect=False) must be within 0.5 points; its default
rectangular batches (``validator_rect``: pad 0.5, 288 px here) are a different input, checked with
the same margin as what a user comparing against `yolo val` sees.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, tiny_config

from kiln import accuracy, batches, export, inputs
from kiln.config import load

pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install 'kiln[ultralytics]')")

CHECKPOINT = REPO / "models" / "ultralytics_demo.pt"
FIGURES = json.loads((REPO / "models" / "ultralytics_demo.json").read_text())
MARGIN = 0.005  # 0.5 mAP points


@pytest.fixture(scope="module")
def kiln_map(tmp_path_factory):
    import onnxruntime as ort

    from kiln.demo.shapes import generate_split

    root = tmp_path_factory.mktemp("ul-fidelity")
    raw = tiny_config()
    raw["datasets"]["demo"]["val"]["count"] = FIGURES["val_count"]
    raw["models"] = {"ul_demo": {"source": "ultralytics", "checkpoint": str(CHECKPOINT), "trust_checkpoint": True,
                                 "layout": "yolo", "dataset": "demo", "input_size": [256, 256],
                                 "calibration": {"images": 8}}}
    raw["devices"] = {"cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32"], "batch_sizes": [1]}}
    cfg = load(raw, base=REPO)
    spec = cfg.models["ul_demo"]
    assert spec.resize_backend == "cv2" and spec.decode == {k: FIGURES["settings"][v] for k, v in
                                                           (("conf_threshold", "conf"), ("iou_threshold", "iou"),
                                                            ("max_det", "max_det"))}
    d = cfg.datasets["demo"]  # the validator's images: the demo's val split, its first val_count
    ann = generate_split(root / "val", "val", d.val_count, seed=d.seed, image_size=d.image_size)
    export.export_onnx(spec, 17, root / "model.onnx")
    data = batches.load(inputs.preprocess_split(spec, ann, d.val_count, root / "val.npz"))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(root / "model.onnx"), so, providers=["CPUExecutionProvider"])
    outputs = batches.run_batches(lambda feeds: dict(zip(spec.output_names, sess.run(None, feeds))), spec, data, 16)
    return accuracy.task_map(spec, outputs, data, ann)


def test_recorded_model_measures_something():
    """A trained model, not a random one: the comparison below is of real detections."""
    assert FIGURES["validator_square"]["map50_95"] > 0.3


def test_kiln_map_matches_ultralytics_validator(kiln_map):
    want = FIGURES["validator_square"]
    got = kiln_map
    assert abs(got["map50_95"] - want["map50_95"]) <= MARGIN, (got, want)
    assert abs(got["map50"] - want["map50"]) <= MARGIN, (got, want)


def test_kiln_map_near_yolo_val_default(kiln_map):
    """`yolo val`'s own default (rect batches, pad 0.5) differs by its input only: within the same margin here."""
    assert abs(kiln_map["map50_95"] - FIGURES["validator_rect"]["map50_95"]) <= MARGIN, (kiln_map, FIGURES)
    assert np.isfinite(kiln_map["map50_95"])
