"""Parity per semantic part, detection matching for YOLO, and validations that can measure nothing.

The reference outputs are real: the committed demo YOLO (and a random-weight one) exported by
kiln.export and run by ONNX Runtime on demo images, as the reference stage does. The perturbations
are those one cosine over the whole (B, 4 + nc, A) output cannot see (issue 15).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, random_checkpoints, tiny_config

from kiln import accuracy, export
from kiln.backends.onnxruntime import OrtRunner
from kiln.batches import load as load_inputs
from kiln.batches import run_batches
from kiln.config import load
from kiln.demo.shapes import generate_split
from kiln.findings import describe_check
from kiln.inputs import preprocess_split
from kiln.validate import compare, gate, measurable, parity

IMAGES = 8


def _reference(tmp: Path, checkpoint: Path) -> tuple:
    """(spec, cfg, reference outputs, inputs, annotations, onnx) of the demo YOLO with `checkpoint`."""
    raw = copy.deepcopy(tiny_config(checkpoint_yolo=str(checkpoint)))
    cfg = load(raw, base=REPO)
    spec = cfg.models["yolo_demo"]
    generate_split(tmp / "val", "val", IMAGES, seed=0, image_size=256)
    annotations = tmp / "val" / "annotations.json"
    npz = preprocess_split(spec, annotations, IMAGES, tmp / "inputs.npz")
    onnx = tmp / "model.onnx"
    export.export_onnx(spec, 17, onnx)
    inputs = load_inputs(npz)
    ref = run_batches(OrtRunner(onnx, providers=["CPUExecutionProvider"], optimize=True).infer, spec, inputs, 8)
    return spec, cfg, ref, inputs, annotations, onnx


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (REPO / "models" / "demo_yolo.pt").is_file():
        pytest.skip("committed checkpoint models/demo_yolo.pt is missing")
    return _reference(tmp_path_factory.mktemp("trained"), REPO / "models" / "demo_yolo.pt")


def _result(spec, ref, out, inputs, annotations, match_score=0.3) -> dict:
    """What the validate stage records of `out` against `ref`: parity, and the mAP drop."""
    par, dets = compare(spec, ref, out, inputs, match_score)
    acc = accuracy.score(dets, inputs, annotations)
    ref_acc = accuracy.task_map(spec, ref, inputs, annotations)
    acc.update(map_drop=ref_acc["map50_95"] - acc["map50_95"], map50_drop=ref_acc["map50"] - acc["map50"])
    return {"parity": par, "accuracy": acc}


def test_old_whole_tensor_cosine_misses_what_the_parts_catch(trained):
    spec, cfg, ref, inputs, annotations, _ = trained
    rng = np.random.default_rng(0)
    noise = {"output0": ref["output0"].copy()}
    noise["output0"][:, 4:] = rng.uniform(0, 1, noise["output0"][:, 4:].shape).astype(np.float32)
    zero = {"output0": ref["output0"].copy()}
    zero["output0"][:, 4:] = 0
    fp32 = cfg.validation["thresholds"]["fp32"]
    int8 = cfg.validation["thresholds"]["int8"]
    for name, out in (("noise", noise), ("zero", zero)):
        # The demonstration: the old check, one cosine over the whole output, stays above even fp32's gate.
        assert parity.dense(ref["output0"], out["output0"])["cosine"] > 0.9999, name
        result = _result(spec, ref, out, inputs, annotations)
        for thresholds in (fp32, int8):
            reasons = gate("yolo", thresholds, result)
            assert not any(r.startswith("output output0 cosine") for r in reasons), (name, reasons)
            scores = [r for r in reasons if r.startswith("class scores (output0 rows 4:) cosine ")]
            assert len(scores) == 1, (name, reasons)
            assert float(scores[0].split()[6]) < thresholds["score_cosine_min"]
    # Zero scores: nothing is detected, so no reference detection is matched either.
    reasons = gate("yolo", int8, _result(spec, ref, zero, inputs, annotations))
    assert f"detection match rate 0.000 < {int8['match_rate_min']}" in reasons
    noisy = _result(spec, ref, noise, inputs, annotations)["parity"]
    assert noisy["parts"]["classes"]["agreement"] < int8["class_agreement_min"]
    assert describe_check(parity.weakest(parity.checks(noisy, int8))).startswith("scores ")


def test_real_engine_outputs_pass_every_part(trained):
    """fp32: the ONNX Runtime engine the cpu device builds (its optimizer on); fp16: the same outputs stored
    in half precision (the rounding an fp16 output binding gives; not an fp16 graph)."""
    spec, cfg, ref, inputs, annotations, onnx = trained
    engine = run_batches(OrtRunner(onnx, providers=["CPUExecutionProvider"], optimize=True).infer, spec, inputs, 1)
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in engine.items()}
    for precision, out in (("fp32", engine), ("fp16", half)):
        result = _result(spec, ref, out, inputs, annotations)
        assert gate("yolo", cfg.validation["thresholds"][precision], result) == [], precision
        par = result["parity"]
        assert set(par["parts"]) == {"boxes", "scores", "classes"}
        assert par["parts"]["classes"]["anchors"] > 0
        # YOLO is matched as detections too (the reference decoded and NMSed with the same code).
        assert par["detections"]["reference_detections"] > 0 and par["detections"]["match_rate"] == 1.0
        assert par["detections"]["mean_box_iou"] > 0.99
        assert measurable(par["detections"]["reference_detections"], IMAGES, 0.3,
                          accuracy.task_map(spec, ref, inputs, annotations)["map50_95"], 0.05) is None


def test_detection_layouts_compare_sorted_scores():
    ref = {"labels": np.array([[0, 1, 2]]), "boxes": np.zeros((1, 3, 4), np.float32),
           "scores": np.array([[0.9, 0.5, 0.5]], np.float32)}
    swapped = {**ref, "labels": np.array([[0, 2, 1]])}
    assert parity.parts("rtdetr", "none", ref, swapped, 0.3)["scores"]["cosine"] == pytest.approx(1.0)
    zero = {**ref, "scores": np.zeros((1, 3), np.float32)}
    assert parity.parts("rtdetr", "none", ref, zero, 0.3)["scores"]["cosine"] == 0.0
    checks = parity.checks({"parts": {}, "detections": {"reference_detections": 4, "match_rate": 1.0,
                                                        "mean_box_iou": 0.8}}, {"match_rate_min": 0.9,
                                                                                "box_iou_min": 0.95})
    assert [c["metric"] for c in checks] == ["match_rate", "mean_box_iou"]
    result = {"parity": {"outputs": {}, "parts": {}, "detections": {"reference_detections": 4, "match_rate": 1.0,
                                                                    "mean_box_iou": 0.8}},
              "accuracy": {"map50_drop": 0, "map_drop": 0}}
    thresholds = {"cosine_min": 0.99, "match_rate_min": 0.9, "box_iou_min": 0.95, "map50_drop_max": 0.01,
                  "map_drop_max": 0.01}
    assert gate("rtdetr", thresholds, result) == ["mean box IoU of matched detections 0.800 < 0.95"]
    assert describe_check(parity.weakest(checks)) == "detections mean box iou 0.8000"


def test_random_weights_are_not_measurable(tmp_path):
    """A random-weight demo YOLO: its own outputs against themselves pass every part, yet mean nothing."""
    random_checkpoints(yolo=tmp_path / "random_yolo.pt")
    spec, cfg, ref, inputs, annotations, _ = _reference(tmp_path, tmp_path / "random_yolo.pt")
    ref_map = accuracy.task_map(spec, ref, inputs, annotations)["map50_95"]
    assert ref_map < cfg.validation["min_reference_map"] == 0.05
    par, _ = compare(spec, ref, ref, inputs, cfg.validation["match_score"])
    why = measurable(par["detections"]["reference_detections"], IMAGES, 0.3, ref_map, 0.05)
    if par["detections"]["reference_detections"] == 0:
        assert why == f"the reference makes no detections above conf 0.3 on {IMAGES} images"
    else:
        assert why == (f"reference mAP50-95 {ref_map:.4f} is below validation.min_reference_map 0.05: "
                       f"with random weights nothing can be compared")
    assert measurable(0, 200, 0.25, 0.5, 0.05) == "the reference makes no detections above conf 0.25 on 200 images"
