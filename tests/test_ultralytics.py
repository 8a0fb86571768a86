"""Source ultralytics: YOLOv8n, YOLO11n and RT-DETR-l built from Ultralytics' own YAMLs, through the whole DAG.

No weights can be downloaded here, so the models carry random weights (seed 0): the tests check
what does not depend on training: layouts, export in Ultralytics' export mode, parity between
PyTorch and ONNX Runtime, simplify, surgery (the device-required passes, NMS), the fp16 and int8
variants, the CPU device's engines, references, validations and summary rows, and TensorRT-RTX
ahead-of-time builds. The three models go through one Snakemake run of the workflow (what a user's
`snakemake --configfile` does). Inputs are small (320, RT-DETR 192) to keep the CPU cost down; all of
it takes a few minutes on 2 cores (marked ``slow``: deselect with ``-m 'not slow'``).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import REPO, tiny_config, write_config

from kiln import export, paths, simplify, surgery
from kiln.config import load
from kiln.errors import KilnError
from kiln.util import read_json

ultralytics = pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install 'kiln[ultralytics]')")

pytestmark = pytest.mark.slow

CFG = Path(ultralytics.__file__).parent / "cfg" / "models"
# The scale is read from the file name (yolov8n.yaml -> scale n), as Ultralytics does.
YAMLS = {"yolov8n": CFG / "v8" / "yolov8.yaml", "yolo11n": CFG / "11" / "yolo11.yaml",
         "rtdetr-l": CFG / "rt-detr" / "rtdetr-l.yaml"}
SIZES = {"yolov8n": 320, "yolo11n": 320, "rtdetr-l": 192}
NC = 3


def sess(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def raw_config(root: Path, **model_extra) -> dict:
    raw = tiny_config()
    raw["models"] = {}
    for name, src in YAMLS.items():
        shutil.copy(src, root / f"{name}.yaml")
        raw["models"][name.replace("-", "_")] = {
            "source": "ultralytics", "ultralytics_yaml": str(root / f"{name}.yaml"), "factory_args": {"nc": NC},
            "layout": "ultralytics_rtdetr" if name.startswith("rtdetr") else "yolo", "dataset": "demo",
            "input_size": [SIZES[name]] * 2, "calibration": {"images": 8}, **model_extra.get(name, {})}
    raw["datasets"]["demo"]["val"]["count"] = 8
    raw["devices"] = {
        # Two streams at most: the stream counts' queries of RT-DETR-l dominated its validations.
        "cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32", "fp16", "int8"], "batch_sizes": [1],
                "max_streams": 2},
        "rtx": {"backend": "tensorrt-rtx", "compute_capability": "8.9", "opset": 17, "precisions": ["fp32", "fp16", "int8"],
                "builder_optimization_level": 0, "batch_sizes": [1]},
        # A Jetson on TensorRT 8.5 at the same opset: its parser has no LayerNormalization (kiln/backends/trt/ops.py).
        "orin": {"backend": "tensorrt", "compute_capability": "8.7", "tensorrt": {"min": "8.5"}, "jetson": True,
                 "opset": 17, "precisions": ["fp16"], "int8_mode": "calibrator"},
    }
    return raw


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ultralytics")


@pytest.fixture(scope="module")
def cfg(root):
    return load(raw_config(root), base=root, check_paths=True)


@pytest.fixture(scope="module")
def images():
    """Two different pictures of the demo dataset (shapes on textures), as float RGB in [0, 1] per size."""
    from kiln.demo.shapes import render_image

    rng = np.random.default_rng(5)
    out = {}
    pics = [render_image(rng, 320)[0] for _ in range(2)]
    for size in set(SIZES.values()):
        arr = [np.asarray(p.resize((size, size)), np.float32) / 255 for p in pics]
        out[size] = np.ascontiguousarray(np.stack(arr).transpose(0, 3, 1, 2))
    return out


@pytest.fixture(scope="module")
def checkpoint(root, cfg):
    """An Ultralytics-format .pt of YOLOv8n whose outputs depend on the picture.

    Straight from the YAML, random weights shrink activations layer by layer, so every picture gets
    nearly the same prediction (YOLO11n's differ by less than 1e-5). Re-estimating BatchNorm statistics
    on four demo pictures (as after training) and a milder class head (weights x0.3, bias -3) give
    content-dependent boxes with distinct scores, up to about 0.9.
    """
    from ultralytics.nn.tasks import DetectionModel

    from kiln.demo.shapes import render_image

    rng = np.random.default_rng(11)
    x = np.stack([np.asarray(render_image(rng, 320)[0], np.float32) / 255 for _ in range(4)]).transpose(0, 3, 1, 2)
    torch.manual_seed(0)
    model = DetectionModel(str(root / "yolov8n.yaml"), nc=NC, verbose=False)  # written by the cfg fixture
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pictures
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(np.ascontiguousarray(x)))
        for m in bns:
            m.momentum = 0.03
        for seq in model.model[-1].cv3:
            seq[-1].weight.mul_(0.3)
            seq[-1].bias.fill_(-3.0)
    model.eval()
    path = root / "yolov8n_bn.pt"
    torch.save({"model": model, "train_args": {}}, path)  # the layout of Ultralytics' own checkpoints
    return path


@pytest.fixture(scope="module")
def dag(root):
    """One `snakemake` run of the workflow on the three models, for the devices of raw_config."""
    work = root / "dag"
    work.mkdir()
    write_config(work / "config.yaml", raw_config(root))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def artifacts(work: Path, name: str) -> dict:
    """The model's ONNX stages, their records and its TensorRT-RTX engine records, as the run wrote them."""
    def at(pattern: str, **kw) -> Path:
        return work / paths.fmt(pattern, results="results", model=name, opset=17, **kw)

    p = {"export": at(paths.EXPORT), "simplified": at(paths.SIMPLIFIED), "surgery": at(paths.SURGERY),
         "simplify_record": read_json(at(paths.SIMPLIFY_RECORD)), "surgery_record": read_json(at(paths.SURGERY_RECORD))}
    for prec in ("fp16", "int8"):
        p[prec] = at(paths.VARIANT, precision=prec)
    for prec in ("fp32", "fp16", "int8"):
        record = at(paths.ENGINE_RECORD, device="rtx", precision=prec)
        if record.is_file():  # not without TensorRT-RTX (check_rtx skips then)
            p[f"rtx_{prec}"] = read_json(record)
            p[f"rtx_{prec}_engine"] = at(paths.ENGINE_FILE, device="rtx", precision=prec)
    return p


@pytest.fixture(scope="module")
def yolov8n(dag):
    return artifacts(dag, "yolov8n")


@pytest.fixture(scope="module")
def yolo11n(dag):
    return artifacts(dag, "yolo11n")


@pytest.fixture(scope="module")
def rtdetr(dag):
    return artifacts(dag, "rtdetr_l")


def check_yolo(cfg, name, art, images):
    spec = cfg.models[name]
    size = spec.input_size[0]
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    m = onnx.load(str(art["export"]))
    assert [i.name for i in m.graph.input] == ["images"] and [o.name for o in m.graph.output] == ["output0"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert art["simplify_record"]["status"] == "simplified"
    # PyTorch (Ultralytics' export mode) against ONNX Runtime, batch 2 on a batch-1 trace.
    x = images[size]
    with torch.no_grad():
        ref = export.build_module(spec)(torch.from_numpy(x)).numpy()
    assert ref.shape == (2, 4 + NC, anchors)
    got = sess(art["surgery"]).run(None, {"images": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    # Box rows are pixels of the 320 input (cx, cy inside it), class rows sigmoid scores.
    assert 0 <= got[:, 0].min() and got[:, 0].max() <= size and 0 <= got[:, 4:].min() and got[:, 4:].max() <= 1
    for prec, floor in (("fp16", 0.999), ("int8", 0.9)):
        out = sess(art[prec]).run(None, {"images": x})[0]
        assert out.shape == got.shape and cosine(out, got) > floor, (prec, cosine(out, got))


def check_rtx(art):
    from kiln.backends import tensorrt_rtx

    if not tensorrt_rtx.is_available():
        pytest.skip("TensorRT-RTX is not installed")
    for prec in ("fp32", "fp16", "int8"):
        meta = art[f"rtx_{prec}"]
        assert meta["status"] == "built", meta
        assert art[f"rtx_{prec}_engine"].stat().st_size == meta["engine_bytes"] > 0
        assert meta["source_precision"] == prec and meta["compute_capability_targets"] == ["SM89"]


def test_yolov8n_every_stage(cfg, yolov8n, images):
    check_yolo(cfg, "yolov8n", yolov8n, images)
    check_rtx(yolov8n)


def test_yolo11n_every_stage(cfg, yolo11n, images):
    check_yolo(cfg, "yolo11n", yolo11n, images)
    check_rtx(yolo11n)


def test_rtdetr_l_every_stage(cfg, rtdetr, images):
    from kiln.parity import detections as match
    from kiln.postprocess import ultralytics_rtdetr_detections

    spec = cfg.models["rtdetr_l"]
    m = onnx.load(str(rtdetr["export"]))
    ops = {n.op_type for n in m.graph.node}
    assert [o.name for o in m.graph.output] == ["output0"]
    assert {"GridSample", "TopK"} <= ops  # deformable attention samples with GridSample
    assert "LayerNormalization" in ops  # opset 17: the AIFI encoder's LayerNorm as one op
    # The TensorRT 8.5 device at opset 17 made the shared graph decompose it (numerically neutral).
    step = next(s for s in rtdetr["surgery_record"]["passes"] if s["pass"] == "decompose_layernorm")
    assert step["rewritten"] >= 1 and step["required_by"] == ["orin"]
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(rtdetr["surgery"])).graph.node}
    x = images[SIZES["rtdetr-l"]]
    with torch.no_grad():
        ref = export.build_module(spec)(torch.from_numpy(x)).numpy()
    got = sess(rtdetr["surgery"]).run(None, {"images": x})[0]
    before = sess(rtdetr["simplified"]).run(None, {"images": x})[0]
    assert ref.shape == got.shape == (2, 300, 6)  # cx cy w h (0..1), score, class: the decoder's top 300
    # Random weights tie many scores, so the top-k order among equals is free: compare sorted scores,
    # then the detections as sets (the validate stage's matching).
    for a in (got, before):
        np.testing.assert_allclose(np.sort(a[..., 4], -1), np.sort(ref[..., 4], -1), rtol=1e-4, atol=1e-5)
        dets = [ultralytics_rtdetr_detections(v, spec.input_size, 0.0) for v in (ref, a)]
        assert match(dets[0], dets[1], min_score=0.0, iou=0.9)["match_rate"] >= 0.99
    fp16 = sess(rtdetr["fp16"]).run(None, {"images": x})[0]
    assert fp16.shape == got.shape and np.isfinite(fp16).all()
    assert cosine(np.sort(fp16[..., 4], -1), np.sort(got[..., 4], -1)) > 0.999
    assert sess(rtdetr["int8"]).run(None, {"images": x})[0].shape == got.shape
    check_rtx(rtdetr)


def test_cpu_device_validates_every_model_and_precision(dag):
    """The CPU rows of the run: engines built, validated against the fp32 reference, one summary row each."""
    from kiln.backends import tensorrt_rtx

    rows = {(r["model"], r["device"], r["precision"]): r for r in read_json(dag / "results/report/summary.json")["rows"]}
    models = ("yolov8n", "yolo11n", "rtdetr_l")
    assert set(rows) == {(m, d, p) for m in models for d, ps in (("cpu", ("fp32", "fp16", "int8")),
                                                                 ("rtx", ("fp32", "fp16", "int8")), ("orin", ("fp16",)))
                         for p in ps}
    for m in models:
        ref = read_json(dag / paths.fmt(paths.REFERENCE_RECORD, results="results", model=m, opset=17))
        assert ref["images"] == 8 and 0 <= ref["accuracy"]["map50_95"] <= 1
        for p in ("fp32", "fp16", "int8"):
            v = read_json(dag / paths.fmt(paths.VALIDATION, results="results", device="cpu", model=m, precision=p))
            row = rows[(m, "cpu", p)]
            assert v["build"]["status"] == "built" and row["status"] == v["status"], (m, p, v["status"], v["reason"])
            assert v["latency"][0]["median_ms"] > 0 and row["latency_median_ms"] == v["latency"][0]["median_ms"]
            assert v["parity"], (m, p)
        # Random weights: every row's reference measures nothing, so no row passes or fails (issue 15). The fp32
        # engine is the reference graph optimized by ONNX Runtime: it must agree, within every gate.
        for p in ("fp32", "fp16", "int8"):
            row = rows[(m, "cpu", p)]
            assert row["status"] == "not measurable", row
            assert row["reason"].startswith(("reference mAP50-95 ", "the reference makes no detections")), row
        assert "(gates:" not in rows[(m, "cpu", "fp32")]["reason"], rows[(m, "cpu", "fp32")]
        if tensorrt_rtx.is_available():
            assert rows[(m, "rtx", "fp32")]["status"] == "built"  # ahead of time: no CUDA driver to run it here
        assert rows[(m, "orin", "fp16")]["status"] == "not run"


def test_nms_in_the_graph_keeps_per_image_detections(root, images, checkpoint, cfg):
    """YOLOv8n with nms: onnx (built for ONNX Runtime only: TensorRT-RTX cannot build NonMaxSuppression)."""
    from kiln.postprocess import decode_yolo, nms_output_detections
    from kiln.precision import PrecisionOptions, make_variant

    raw = raw_config(root)
    m = raw["models"]["yolov8n"]
    del m["ultralytics_yaml"]
    m.update(checkpoint=str(checkpoint), trust_checkpoint=True, nms="onnx",
             decode={"conf_threshold": 0.05, "max_det": 100})
    with pytest.raises(KilnError, match=r"'devices.rtx' builds model 'yolov8n', whose nms: onnx appends NonMaxSuppression"):
        load(copy.deepcopy(raw), base=root)
    raw["devices"] = {"cpu": {"backend": "onnxruntime", "precisions": ["fp32", "fp16"], "models": ["yolov8n"]}}
    cfg = load(raw, base=root)
    spec = cfg.models["yolov8n"]
    d = root / "nms"
    d.mkdir()
    export.export_onnx(spec, 17, d / "e.onnx")
    simplify.simplify(d / "e.onnx", d / "s.onnx", d / "s.json")
    sp = surgery.params(cfg, "yolov8n", 17)
    # iou_threshold not set: source ultralytics takes its validator's 0.7 (kiln/config.py SOURCE_DEFAULTS).
    assert sp["nms"] == {"kind": "onnx", "conf_threshold": 0.05, "iou_threshold": 0.7, "max_det": 100}
    surgery.run_passes(d / "s.onnx", d / "g.onnx", d / "g.json", sp["surgery"], nms=sp["nms"])
    x = images[320]
    num, boxes, scores, classes = sess(d / "g.onnx").run(None, {"images": x})
    raw_out = sess(d / "s.onnx").run(None, {"images": x})[0]
    assert num.shape == (2, 1) and boxes.shape == (2, 100, 4)
    got = nms_output_detections(num, boxes, scores, classes)
    want = decode_yolo(raw_out, 0.05, 0.7, 100)
    for g, (wb, ws, wc) in zip(got, want):
        assert len(g["scores"]) == len(ws) > 0
        np.testing.assert_allclose(g["scores"], ws, rtol=1e-5)
        np.testing.assert_allclose(g["boxes"], wb, rtol=1e-4, atol=1e-2)
        np.testing.assert_array_equal(g["labels"], wc)
    assert not np.array_equal(scores[0], scores[1])  # each image its own detections
    one = sess(d / "g.onnx").run(None, {"images": x[1:]})
    np.testing.assert_allclose(one[2][0], scores[1], rtol=1e-5)
    # AutoCast keeps NonMaxSuppression in fp32 (ONNX defines it for float only): the fp16 variant runs.
    make_variant(d / "g.onnx", d / "fp16.onnx", PrecisionOptions("fp16"), log=lambda s: None)
    n16 = sess(d / "fp16.onnx").run(None, {"images": x})
    assert n16[0].shape == (2, 1) and abs(int(n16[0][0, 0]) - int(num[0, 0])) <= max(3, int(num[0, 0]) // 10)


def test_checkpoint_needs_trust_and_loads_with_it(root, checkpoint, cfg):
    """An Ultralytics .pt pickles the model object: refused at config load unless trust_checkpoint."""
    raw = raw_config(root)
    raw["models"] = {"det": {"source": "ultralytics", "checkpoint": str(checkpoint), "layout": "yolo",
                             "dataset": "demo", "input_size": [320, 320], "calibration": {"images": 8}}}
    raw["devices"] = {"cpu": {"backend": "onnxruntime", "precisions": ["fp32"]}}
    with pytest.raises(KilnError) as err:
        load(copy.deepcopy(raw), base=root)
    assert "pickles the whole model object, so loading it can run code" in str(err.value)
    assert "set 'models.det.trust_checkpoint: true' only if you trust where the file comes from" in str(err.value)
    raw["models"]["det"]["trust_checkpoint"] = True
    spec = load(raw, base=root).models["det"]
    export.export_onnx(spec, 17, root / "det.onnx")
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    got = sess(root / "det.onnx").run(None, {"images": x})[0]
    with torch.no_grad():
        ref = export.build_module(spec)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(KilnError, match=r"'models.det.layout' is 'ultralytics_rtdetr' but this Ultralytics model "
                                        r"\(Detect head\) exports layout 'yolo'"):
        bad = copy.deepcopy(raw)
        bad["models"]["det"]["layout"] = "ultralytics_rtdetr"
        export.build_module(load(bad, base=root).models["det"])


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_export_has_ultralytics_own_graph(root, cfg, name, tmp_path, monkeypatch):
    """Kiln's ONNX has the nodes of Ultralytics' own ``export(format="onnx")`` (unsimplified, same opset and size).

    YOLO11's C3k2 subclasses C2f: the exporter's ``isinstance(m, C2f)`` gives it ``forward_split`` too
    (a name check left YOLO11n with extra Shape/Gather/Slice nodes). Both from the YAML with 80 classes.
    """
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)  # Ultralytics writes NAME.onnx into the working folder
    torch.manual_seed(0)
    theirs = onnx.load(YOLO(str(root / f"{name}.yaml")).export(format="onnx", imgsz=SIZES[name], opset=17,
                                                                simplify=False, dynamic=False, verbose=False))
    import dataclasses

    spec = dataclasses.replace(cfg.models[name], factory_args={}, dynamic_batch=False)
    export.export_onnx(spec, 17, tmp_path / "kiln.onnx")
    ours = onnx.load(str(tmp_path / "kiln.onnx"))

    def ops(m):
        return sorted(n.op_type for n in m.graph.node)

    assert ops(ours) == ops(theirs)
    meta = {p.key: p.value for p in ours.metadata_props}
    want = {p.key: p.value for p in theirs.metadata_props}
    assert {k: meta[k] for k in ("stride", "task", "imgsz", "names")} == {k: want[k] for k in ("stride", "task", "imgsz", "names")}
    assert meta["layout"] == "yolo"


def test_class_count_is_known_before_any_job(root, checkpoint, cfg):
    """Ultralytics: the model YAML's nc (factory_args nc over it), or the nc a trusted .pt's pickle records
    (read by pickletools, nothing unpickled); an 80-class model on the 3-class demo dataset is refused at load."""
    import dataclasses

    from kiln.sources import num_classes

    assert num_classes(cfg.models["yolov8n"], root) == (NC, "'models.yolov8n.factory_args.nc'")
    trusted = dataclasses.replace(cfg.models["yolov8n"], ultralytics_yaml=None, checkpoint=str(checkpoint),
                                  trust_checkpoint=True)
    assert num_classes(trusted, root) == (NC, f"checkpoint '{checkpoint}' model yaml nc")
    raw = raw_config(root)
    raw["models"] = {"yolov8n": raw["models"]["yolov8n"]}
    raw["models"]["yolov8n"]["factory_args"] = {}  # the YAML's own nc: 80
    raw["devices"] = {"cpu": raw["devices"]["cpu"]}
    with pytest.raises(KilnError) as err:
        load(raw, base=root)
    assert str(err.value) == (
        f"config: 'models.yolov8n' has 80 classes ('{root / 'yolov8n.yaml'}' nc) but its dataset 'demo' has 3 "
        f"(generator shapes): set 'models.yolov8n.factory_args.nc: 3', or point "
        f"'models.yolov8n.dataset' at the dataset it was trained on")
