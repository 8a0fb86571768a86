"""Parity of a model's outputs against the fp32 reference, and the accuracy gate.

Dense outputs are compared elementwise. Top-k detection outputs (RT-DETR style)
are also compared as detections, since a legitimately different order of equal
scores would make an elementwise comparison fail.

Shared by the stages that judge outputs against the reference: validate (on the
validation split, on the device) and sensitivity / the mixed-precision fallback
(on the calibration split, ONNX Runtime CPU); below all of them.
"""

from __future__ import annotations

import numpy as np

from kiln.postprocess import box_iou


def dense(ref: np.ndarray, out: np.ndarray) -> dict:
    """max abs error, max relative error and cosine similarity of one output."""
    if ref.shape != out.shape:
        return {"shape_ref": list(ref.shape), "shape": list(out.shape), "error": "shape mismatch"}
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    diff = np.abs(o - r)
    # Relative error with a floor so elements that are ~0 in the reference don't dominate.
    floor = max(1e-3 * float(np.abs(r).max(initial=0.0)), 1e-12)
    denom = np.maximum(np.abs(r), floor)
    norm = float(np.linalg.norm(r) * np.linalg.norm(o))
    cosine = float(np.dot(r, o) / norm) if norm > 0 else (1.0 if not diff.any() else 0.0)
    result = {
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float((diff / denom).max(initial=0.0)),
        "cosine": cosine,
    }
    if not np.issubdtype(ref.dtype, np.floating):
        result["exact_match"] = float((ref == out).mean()) if ref.size else 1.0
    return result


def detections(ref: list[dict], out: list[dict], min_score: float, iou: float = 0.5) -> dict:
    """Share of reference detections (score >= min_score) found again with the same label at IoU >= iou.

    Greedy by reference score; reports the box and score errors over matched pairs.
    """
    total = matched = 0
    box_err = score_err = 0.0
    for r, o in zip(ref, out, strict=True):
        keep = r["scores"] >= min_score
        rb, rs, rl = r["boxes"][keep], r["scores"][keep], r["labels"][keep]
        # Candidates may sit a little below the threshold after quantization.
        ck = o["scores"] >= min_score * 0.5
        ob, os_, ol = o["boxes"][ck], o["scores"][ck], o["labels"][ck]
        used = np.zeros(len(ob), dtype=bool)
        for j in np.argsort(-rs):
            total += 1
            cand = np.flatnonzero((ol == rl[j]) & ~used)
            if cand.size == 0:
                continue
            ious = box_iou(rb[j][None], ob[cand])[0]
            best = int(np.argmax(ious))
            if ious[best] >= iou:
                k = cand[best]
                used[k] = True
                matched += 1
                box_err = max(box_err, float(np.abs(ob[k] - rb[j]).max()))
                score_err = max(score_err, float(abs(os_[k] - rs[j])))
    return {
        "reference_detections": total,
        "matched": matched,
        "match_rate": matched / total if total else 1.0,
        "box_max_abs": box_err,
        "score_max_abs": score_err,
        "min_score": min_score,
        "iou": iou,
    }


def gate(layout: str, thresholds: dict, result: dict) -> list[str]:
    """Every threshold the result misses, as readable reasons (empty list = pass).

    `result` holds `parity` (outputs, detections where matched) and `accuracy` (map50_drop, map_drop).
    """
    failures = []
    if layout == "rtdetr" or "detections" in result["parity"]:  # top-k or NMS outputs: matched as detections
        rate = result["parity"]["detections"]["match_rate"]
        if rate < thresholds["match_rate_min"]:
            failures.append(f"detection match rate {rate:.3f} < {thresholds['match_rate_min']}")
    else:
        for name, m in result["parity"]["outputs"].items():
            if "error" in m:
                failures.append(f"output {name}: {m['error']}")
            elif m["cosine"] < thresholds["cosine_min"]:
                failures.append(f"output {name} cosine {m['cosine']:.5f} < {thresholds['cosine_min']}")
    for key, limit in (("map50_drop", "map50_drop_max"), ("map_drop", "map_drop_max")):
        drop = result["accuracy"][key]
        if drop > thresholds[limit]:
            failures.append(f"{key.replace('_', ' ')} {drop:.4f} > {thresholds[limit]}")
    return failures
