"""Fidelity to the source framework: preprocessing and defaults per source, ONNX metadata, docs that agree.

The demo (source torch) keeps its PIL path: its preprocessed inputs must stay the bytes kiln.lock
records. Source ultralytics gets Ultralytics' own letterbox (OpenCV INTER_LINEAR, grey 114, its
rounding) and its validator's NMS IoU.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest
from PIL import Image

from kiln import inputs, preprocess
from kiln.backends.trt.ops import PARSER_MAX_OPSET, TENSORRT
from kiln.config import load, load_file
from kiln.lock import arrays_sha256, read_lock
from tests.conftest import REPO


def _ultralytics_model(config_dict, tmp_path, **extra):
    (tmp_path / "m.yaml").write_text("nc: 3\n")
    config_dict["models"]["ul"] = {"source": "ultralytics", "ultralytics_yaml": str(tmp_path / "m.yaml"),
                                   "layout": "yolo", "dataset": "demo", "input_size": [256, 256],
                                   "calibration": {"images": 8}, **extra}
    return load(config_dict, check_paths=False)


def test_defaults_follow_the_source(config_dict, tmp_path):
    cfg = _ultralytics_model(config_dict, tmp_path)
    ul, demo = cfg.models["ul"], cfg.models["yolo_demo"]
    assert (ul.resize_backend, ul.decode) == ("cv2", {"conf_threshold": 0.001, "iou_threshold": 0.7, "max_det": 300})
    assert (demo.resize_backend, demo.decode["iou_threshold"]) == ("pil", 0.6)
    assert cfg.models["rtdetr_demo"].resize_backend == "pil"
    # What the user sets wins over the source's default.
    cfg = _ultralytics_model(copy.deepcopy(config_dict), tmp_path, resize_backend="pil", decode={"iou_threshold": 0.5})
    assert (cfg.models["ul"].resize_backend, cfg.models["ul"].decode["iou_threshold"]) == ("pil", 0.5)
    assert inputs.params(cfg, "ul", "val")["preprocess"] == "letterbox"


def test_resize_backend_is_checked(config_dict, tmp_path):
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"'models.ul.resize_backend' is 'opencv': use one of pil, cv2"):
        _ultralytics_model(config_dict, tmp_path, resize_backend="opencv")


def test_demo_inputs_params_unchanged():
    """The demo's inputs jobs keep their params (no new key), so Snakemake does not remake them."""
    cfg = load_file(REPO / "config.yaml", base=REPO)
    for model in ("yolo_demo", "rtdetr_demo"):
        assert set(inputs.params(cfg, model, "val")) == {"input_size", "preprocess", "count"}


def test_demo_inputs_are_the_locked_bytes(tmp_path):
    """The demo's val split, preprocessed now, has the arrays_sha256 that kiln.lock records."""
    from kiln.demo.shapes import generate_split

    cfg = load_file(REPO / "config.yaml", base=REPO)
    d = cfg.datasets["demo"]
    ann = generate_split(tmp_path / "val", "val", d.val_count, seed=d.seed, image_size=d.image_size)
    locked = read_lock(REPO / "kiln.lock")["artifacts"]
    for model in ("yolo_demo", "rtdetr_demo"):
        out = inputs.preprocess_split(cfg.models[model], ann, d.val_count, tmp_path / f"{model}.npz")
        assert arrays_sha256(out) == locked[f"inputs/{model}/val.npz"]["arrays_sha256"], model


@pytest.fixture
def photo():
    """A non-square picture that must be scaled (down and up), with fine detail where resizers disagree."""
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (203, 317, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(256, 256), (640, 640), (320, 448)])
def test_letterbox_cv2_is_ultralytics_letterbox(photo, size):
    """Pixel for pixel what Ultralytics' LetterBox (its predictor and exporter's) makes of the same image."""
    augment = pytest.importorskip("ultralytics.data.augment", reason="ultralytics is not installed")
    want = augment.LetterBox(new_shape=size, auto=False, scale_fill=False, scaleup=True, center=True)(
        image=np.ascontiguousarray(np.asarray(photo)))
    got, r, (left, top) = preprocess.letterbox_cv2(photo, size)
    assert got.shape == (*size, 3) and np.array_equal(got, want)
    pil, r_pil, pad_pil = preprocess.letterbox(photo, size)
    assert (r, (left, top)) == (r_pil, pad_pil)  # the same placement: boxes map back the same way
    assert np.abs(pil.astype(int) - got.astype(int)).max() > 0  # the other resizer: why the key exists


def test_resize_cv2_is_ultralytics_scale_fill(photo):
    augment = pytest.importorskip("ultralytics.data.augment", reason="ultralytics is not installed")
    want = augment.LetterBox(new_shape=(256, 256), auto=False, scale_fill=True, scaleup=True)(
        image=np.ascontiguousarray(np.asarray(photo)))
    assert np.array_equal(preprocess.resize_cv2(photo, (256, 256)), want)


def test_prepare_dispatches_on_the_spec(photo, config_dict, tmp_path):
    cfg = _ultralytics_model(config_dict, tmp_path)
    arr, _, _ = preprocess.prepare(cfg.models["ul"], photo)
    assert np.array_equal(arr, preprocess.letterbox_cv2(photo, (256, 256))[0])
    arr, _, _ = preprocess.prepare(cfg.models["yolo_demo"], photo)
    assert np.array_equal(arr, preprocess.letterbox(photo, (256, 256))[0])


def test_export_metadata_is_written_and_reproducible(tmp_path):
    """Two exports of the demo YOLO give the same bytes, with task, imgsz, layout and stride in metadata_props."""
    from kiln import export

    cfg = load_file(REPO / "config.yaml", base=REPO)
    spec = cfg.models["yolo_demo"]
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    record = export.export_onnx(spec, 17, a)
    export.export_onnx(spec, 17, b)
    assert a.read_bytes() == b.read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(a)).metadata_props}
    assert meta == record["metadata"]
    assert meta["task"] == "detect" and meta["imgsz"] == "[256, 256]" and meta["layout"] == "yolo"
    assert not re.search(r"\d{4}-\d\d-\d\d|/", "".join(meta.values()))  # no dates, no paths


def test_surgery_keeps_the_metadata(tmp_path):
    from onnx import TensorProto, helper

    from kiln import surgery

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="names", value="{0: 'circle'}")
    onnx.save(model, str(tmp_path / "in.onnx"))
    surgery.run_passes(tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "s.json", ["cleanup"])
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props} == {"names": "{0: 'circle'}"}


def test_docs_state_tensorrt_85_once_as_the_table_says():
    """docs/models.md states TensorRT 8.5's parser (its highest opset from the op table, no LayerNormalization);
    docs/config.md refers to it and claims no other opset."""
    models_md = (REPO / "docs" / "models.md").read_text()
    config_md = (REPO / "docs" / "config.md").read_text()
    top = PARSER_MAX_OPSET[TENSORRT][(8, 5)]
    assert f"**opset {top}, but it has no LayerNormalization op**" in models_md
    assert "#what-tensorrt-85s-parser-takes" in config_md and "### What TensorRT 8.5's parser takes" in models_md
    for text in (models_md, config_md):
        for claim in re.findall(r"TensorRT 8\.5 parses[^.|]*?opset (\d+)", text):
            assert int(claim) == top
