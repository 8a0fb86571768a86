"""Turn raw detector outputs into per-image detections, in plain numpy.

Used identically for PyTorch, ONNX Runtime and TensorRT outputs so that accuracy
differences between variants come from the model, never from post-processing.
Everything here is pure numpy (no torchvision) so it runs anywhere Kiln runs.

Detections are dicts ``{"boxes": (N, 4) float32 xyxy, "scores": (N,) float32,
"labels": (N,) int64}`` with 0-based class indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Offset per class used to make one NMS pass class-aware (boxes of different classes
# never overlap after shifting); same constant as Ultralytics' max_wh.
_CLASS_OFFSET = 7680.0
# Cap on candidates entering NMS (Ultralytics' max_nms): bounds the cost at conf=0.001.
_MAX_NMS = 30000


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_det: int | None = None) -> np.ndarray:
    """Greedy NMS; returns kept indices sorted by descending score.

    A box is suppressed when its IoU with a higher-scoring kept box is > iou_thres
    (torchvision's convention).  Stops early once ``max_det`` boxes are kept.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    # Stable sort so ties resolve by original order: keeps results reproducible.
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        if max_det is not None and len(keep) >= max_det:
            break
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_thres]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thres: float, max_det: int | None = None
) -> np.ndarray:
    """Class-aware NMS: boxes only suppress boxes of the same label."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    offsets = np.asarray(labels, dtype=np.float32).reshape(-1, 1) * _CLASS_OFFSET
    return nms(boxes + offsets, scores, iou_thres, max_det)


def _empty() -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "scores": np.zeros((0,), dtype=np.float32),
        "labels": np.zeros((0,), dtype=np.int64),
    }


def decode_yolo(
    out: np.ndarray, conf: float, iou: float, max_det: int, multi_label: bool = True
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode a YOLOv8-layout output (B, 4 + nc, A) with class-aware NMS.

    Returns per image ``(boxes_xyxy (N, 4) float32, scores (N,) float32, class_ids (N,) int64)``.
    ``multi_label`` keeps every (anchor, class) pair above ``conf`` rather than only
    the best class per anchor: that is what Ultralytics' validator does, so mAP here
    is comparable with ``yolo val``.
    """
    out = np.asarray(out)
    if out.ndim != 3 or out.shape[1] < 5:
        raise ValueError(f"expected YOLO output shaped (B, 4 + nc, A), got {out.shape}")
    results = []
    for pred in out.astype(np.float32, copy=False):
        pred = pred.T  # (A, 4 + nc)
        cxcywh, cls_scores = pred[:, :4], pred[:, 4:]
        if multi_label:
            anchor_idx, class_idx = np.nonzero(cls_scores > conf)
            scores = cls_scores[anchor_idx, class_idx]
        else:
            class_idx = cls_scores.argmax(1)
            scores = cls_scores[np.arange(cls_scores.shape[0]), class_idx]
            anchor_idx = np.nonzero(scores > conf)[0]
            class_idx, scores = class_idx[anchor_idx], scores[anchor_idx]
        if scores.size == 0:
            results.append((np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)))
            continue
        if scores.size > _MAX_NMS:
            top = np.argsort(-scores, kind="stable")[:_MAX_NMS]
            anchor_idx, class_idx, scores = anchor_idx[top], class_idx[top], scores[top]
        c = cxcywh[anchor_idx]
        boxes = np.stack(
            (c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2, c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2), 1
        ).astype(np.float32)
        keep = batched_nms(boxes, scores, class_idx, iou, max_det)
        results.append((boxes[keep], scores[keep].astype(np.float32), class_idx[keep].astype(np.int64)))
    return results


def yolo_detections(
    output: np.ndarray, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300
) -> list[dict[str, np.ndarray]]:
    """Per-image detection dicts from a YOLOv8-layout output (B, 4 + nc, A).

    Boxes stay in model-input pixels; undo letterboxing with :func:`scale_boxes_letterbox`.
    """
    return [{"boxes": b, "scores": s, "labels": c} for b, s, c in decode_yolo(output, conf_thres, iou_thres, max_det)]


def rtdetr_detections(
    labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, conf_thres: float = 0.001
) -> list[dict[str, np.ndarray]]:
    """Per-image detection dicts from RT-DETR deploy outputs (labels, boxes, scores).

    RT-DETR is NMS-free and its boxes are already xyxy in original-image pixels, so
    this only drops detections at or below ``conf_thres``.
    """
    labels = np.asarray(labels)
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if labels.shape != scores.shape or boxes.shape[:2] != scores.shape or boxes.shape[-1] != 4:
        raise ValueError(
            f"RT-DETR outputs disagree: labels {labels.shape}, boxes {boxes.shape}, scores {scores.shape};"
            " expected (B, K), (B, K, 4), (B, K)"
        )
    results = []
    for lab, box, sc in zip(labels, boxes, scores):
        keep = sc > conf_thres
        if not keep.any():
            results.append(_empty())
            continue
        order = np.argsort(-sc[keep], kind="stable")
        results.append(
            {
                "boxes": box[keep][order].astype(np.float32),
                "scores": sc[keep][order].astype(np.float32),
                "labels": lab[keep][order].astype(np.int64),
            }
        )
    return results


def scale_boxes_letterbox(
    boxes: np.ndarray,
    ratio: float | Sequence[float],
    pad: Sequence[float],
    orig_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Map xyxy boxes from letterboxed-input pixels back to original-image pixels.

    ``ratio`` is the resize gain (a float, or (rx, ry)); ``pad`` is the (left, top)
    padding added after resizing.  With ``orig_shape`` (height, width) boxes are
    clipped to the image, as Ultralytics does.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    rx, ry = (float(ratio), float(ratio)) if np.isscalar(ratio) else (float(ratio[0]), float(ratio[1]))
    b[:, [0, 2]] = (b[:, [0, 2]] - float(pad[0])) / rx
    b[:, [1, 3]] = (b[:, [1, 3]] - float(pad[1])) / ry
    if orig_shape is not None:
        h, w = int(orig_shape[0]), int(orig_shape[1])
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b


def ultralytics_rtdetr_detections(
    output: np.ndarray, input_size: Sequence[int], conf_thres: float = 0.001
) -> list[dict[str, np.ndarray]]:
    """Per-image detections from Ultralytics' RT-DETR export (B, K, 6): cx, cy, w, h normalised, score, class.

    Boxes come back xyxy in model-input pixels (``input_size`` is (height, width)), like
    :func:`yolo_detections`; the decoder already picked its top-K, so this only thresholds.
    """
    out = np.asarray(output, dtype=np.float32)
    if out.ndim != 3 or out.shape[-1] != 6:
        raise ValueError(f"expected Ultralytics RT-DETR output shaped (B, K, 6), got {out.shape}")
    h, w = float(input_size[0]), float(input_size[1])
    results = []
    for pred in out:
        keep = pred[:, 4] > conf_thres
        if not keep.any():
            results.append(_empty())
            continue
        p = pred[keep]
        p = p[np.argsort(-p[:, 4], kind="stable")]
        cx, cy, bw, bh = p[:, 0] * w, p[:, 1] * h, p[:, 2] * w, p[:, 3] * h
        boxes = np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1).astype(np.float32)
        results.append({"boxes": boxes, "scores": p[:, 4].astype(np.float32), "labels": p[:, 5].astype(np.int64)})
    return results


def nms_output_detections(
    num: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, conf_thres: float = 0.0
) -> list[dict[str, np.ndarray]]:
    """Per-image detections from NMS appended to the graph (EfficientNMS_TRT's layout).

    ``num`` (B, 1), ``boxes`` (B, M, 4) xyxy in model-input pixels, ``scores`` (B, M), ``classes``
    (B, M): the first ``num[i]`` rows of image i are its detections, best first.
    """
    num = np.asarray(num).reshape(-1)
    boxes, scores, classes = np.asarray(boxes, np.float32), np.asarray(scores, np.float32), np.asarray(classes)
    if boxes.ndim != 3 or boxes.shape[:2] != scores.shape or classes.shape != scores.shape or len(num) != len(boxes):
        raise ValueError(
            f"NMS outputs disagree: num_detections {num.shape}, boxes {boxes.shape}, "
            f"scores {scores.shape}, classes {classes.shape}"
        )
    results = []
    for n, b, s, c in zip(num, boxes, scores, classes):
        n = int(min(max(int(n), 0), len(s)))
        keep = s[:n] > conf_thres
        results.append(
            {
                "boxes": b[:n][keep].astype(np.float32),
                "scores": s[:n][keep].astype(np.float32),
                "labels": c[:n][keep].astype(np.int64),
            }
        )
    return results
