"""Task accuracy: a model's raw outputs to detections in original pixels, then COCO mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.batches import Inputs
from kiln.errors import KilnError
from kiln.specs import ModelSpec


def _unletterbox(boxes: np.ndarray, ratio: float, pad: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Map xyxy boxes from letterboxed input pixels back to the original image, clipped to it."""
    out = (boxes - np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float64)) / ratio
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, size[0])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, size[1])
    return out.astype(np.float32)


def detections(spec: ModelSpec, outputs: dict[str, np.ndarray], inputs: Inputs) -> list[dict]:
    """Per-image detections (boxes xyxy in original pixels, scores, 0-based labels) from stacked outputs."""
    from kiln import postprocess

    dec = spec.decode
    if spec.layout == "rtdetr":
        # The deploy model already returns xyxy boxes in original pixels (orig_target_sizes).
        return postprocess.rtdetr_detections(
            outputs["labels"], outputs["boxes"], outputs["scores"], conf_thres=dec["conf_threshold"]
        )
    if spec.nms != "none":  # NMS in the graph (kiln.surgery.append_nms): boxes xyxy in input pixels
        dets = postprocess.nms_output_detections(outputs["num_detections"], outputs["boxes"], outputs["scores"],
                                                 outputs["classes"], conf_thres=dec["conf_threshold"])
    elif spec.layout == "ultralytics_rtdetr":
        dets = postprocess.ultralytics_rtdetr_detections(outputs["output0"], spec.input_size, dec["conf_threshold"])
    else:
        dets = postprocess.yolo_detections(
            outputs["output0"], conf_thres=dec["conf_threshold"], iou_thres=dec["iou_threshold"], max_det=dec["max_det"]
        )
    for i, d in enumerate(dets):
        if spec.preprocess == "letterbox":
            d["boxes"] = _unletterbox(d["boxes"], inputs.ratios[i], inputs.pads[i], inputs.orig_sizes[i])
        else:
            h, w = spec.input_size
            sx, sy = inputs.orig_sizes[i][0] / w, inputs.orig_sizes[i][1] / h
            d["boxes"] = (d["boxes"] * np.array([sx, sy, sx, sy])).astype(np.float32)
    return dets


def check_classes(spec: ModelSpec, onnx_path: str | Path, annotations: str | Path) -> None:
    """Refuse an ONNX whose class count (recorded by the export stage, kiln.classes) is not the dataset's.

    The config load compares the counts the config or checkpoint state; this catches the one only the
    exported graph showed. An ONNX without a recorded count passes (nothing is guessed).
    """
    import onnx

    from kiln import classes

    model = onnx.load(str(onnx_path), load_external_data=False)
    have = classes.recorded(model)
    categories = json.loads(Path(annotations).read_text())["categories"]
    if have is None or have == len(categories):
        return
    how = {p.key: p.value for p in model.metadata_props}.get(classes.FROM_KEY, "")
    raise KilnError(
        f"'{onnx_path}' of 'models.{spec.name}' outputs {have} classes ({how}) but its dataset '{spec.dataset}' has "
        f"{len(categories)} categories ('{annotations}'), so its mAP would mean nothing: give the model a head of "
        f"{len(categories)} classes, or point 'models.{spec.name}.dataset' at the dataset it was trained on"
    )


def score(dets: list[dict], inputs: Inputs, annotations: str | Path) -> dict:
    """mAP50-95 and mAP50 (pycocotools) of per-image detections over the validation split."""
    from kiln.metrics import coco_map

    categories = sorted(c["id"] for c in json.loads(Path(annotations).read_text())["categories"])
    return coco_map(Path(annotations), [int(i) for i in inputs.image_ids], dets, categories)


def task_map(spec: ModelSpec, outputs: dict[str, np.ndarray], inputs: Inputs, annotations: str | Path) -> dict:
    """mAP of stacked raw outputs: decode, then score."""
    return score(detections(spec, outputs, inputs), inputs, annotations)
