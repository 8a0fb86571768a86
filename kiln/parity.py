"""Parity of a model's outputs against the fp32 reference, and the accuracy gate.

Dense outputs are compared elementwise, and each layout Kiln knows is also split into its semantic
parts (:func:`parts`): one cosine over a whole YOLO ``(B, 4 + nc, A)`` tensor is ruled by the box
coordinates (up to the input size), so class scores (0 to 1) replaced by noise or zeros still give
0.99999. Every detection layout is also compared as detections after decoding and NMS
(:func:`detections`), since a legitimately different order of equal scores would make an
elementwise comparison of top-k outputs fail.

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
    box_err = score_err = iou_sum = 0.0
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
                iou_sum += float(ious[best])
                box_err = max(box_err, float(np.abs(ob[k] - rb[j]).max()))
                score_err = max(score_err, float(abs(os_[k] - rs[j])))
    return {
        "reference_detections": total,
        "matched": matched,
        "match_rate": matched / total if total else 1.0,
        "mean_box_iou": iou_sum / matched if matched else None,
        "box_max_abs": box_err,
        "score_max_abs": score_err,
        "min_score": min_score,
        "iou": iou,
    }


def _sorted_scores(scores: np.ndarray) -> np.ndarray:
    """Each image's scores in descending order: top-k outputs of equal scores may legitimately swap places."""
    return -np.sort(-scores.reshape(scores.shape[0], -1), axis=1)


def _classes(ref_scores: np.ndarray, out_scores: np.ndarray, min_score: float) -> dict:
    """Share of anchors the reference is confident about (best score >= min_score) whose best class the engine keeps."""
    best = ref_scores.max(axis=1)  # (B, A)
    keep = best >= min_score
    ref_cls = ref_scores.argmax(axis=1)[keep]
    out_cls = out_scores.argmax(axis=1)[keep]
    n = int(keep.sum())
    return {"agreement": float((ref_cls == out_cls).mean()) if n else None, "anchors": n, "min_score": min_score}


def parts(layout: str, nms: str, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], min_score: float) -> dict:
    """The outputs split into their semantic parts, each compared on its own: boxes, scores, classes.

    * yolo ``output0`` (B, 4 + nc, A): rows 0-3 are boxes (cx, cy, w, h), rows 4: class scores; classes are
      the best class of each anchor the reference scores at least ``min_score``;
    * rtdetr ``labels`` / ``boxes`` / ``scores`` and ultralytics_rtdetr ``output0`` (B, K, 6: box, score,
      class), and yolo with NMS in the graph (``scores``): the top-k scores, sorted per image. Their boxes
      and classes are compared after matching (:func:`detections`: IoU of matched pairs, same label).

    An output whose shape differs is reported by :func:`dense` and gives no parts.
    """
    if layout == "yolo" and nms == "none":
        r, o = ref["output0"], out["output0"]
        if r.shape != o.shape or r.ndim != 3 or r.shape[1] <= 4:
            return {}
        return {"boxes": dense(r[:, :4], o[:, :4]), "scores": dense(r[:, 4:], o[:, 4:]),
                "classes": _classes(r[:, 4:], o[:, 4:], min_score)}
    if layout == "ultralytics_rtdetr":
        r, o = ref["output0"][..., 4], out["output0"][..., 4]
    else:  # rtdetr, or NMS outputs
        r, o = ref["scores"], out["scores"]
    if r.shape != o.shape:
        return {}
    return {"scores": {**dense(_sorted_scores(r), _sorted_scores(o)), "sorted": True}}


# (part, metric in the part's record, threshold key): what gate() holds each part to.
PART_GATES = (("boxes", "cosine", "box_cosine_min"), ("scores", "cosine", "score_cosine_min"),
              ("classes", "agreement", "class_agreement_min"))
DETECTION_GATES = (("match_rate", "match_rate_min"), ("mean_box_iou", "box_iou_min"))


def checks(par: dict, thresholds: dict) -> list[dict]:
    """Each part's value against its threshold: {part, value, min}; a part with nothing to measure is left out."""
    out = []
    for part, metric, key in PART_GATES:
        value = (par.get("parts") or {}).get(part, {}).get(metric)
        if value is not None:
            out.append({"part": part, "metric": metric, "value": value, "min": thresholds[key]})
    det = par.get("detections")
    if det and det["reference_detections"]:
        for metric, key in DETECTION_GATES:
            if det.get(metric) is not None:
                out.append({"part": "detections", "metric": metric, "value": det[metric], "min": thresholds[key]})
    return out


def weakest(found: list[dict]) -> dict | None:
    """The check nearest its threshold (or furthest below it), measured in units of its allowed shortfall."""
    def shortfall(c: dict) -> float:
        room = 1.0 - c["min"]
        return (1.0 - c["value"]) / room if room > 0 else (0.0 if c["value"] >= c["min"] else float("inf"))

    return max(found, key=shortfall, default=None)


# What a part's reason calls it, by the record's shape (parts()).
PART_NAMES = {"boxes": "box coordinates (output0 rows 0-3)", "scores": "class scores (output0 rows 4:)",
              "classes": "best class"}


def gate(layout: str, thresholds: dict, result: dict) -> list[str]:
    """Every threshold the result misses, as readable reasons (empty list = pass).

    `result` holds `parity` (outputs, their parts, detections where matched) and `accuracy` (map50_drop,
    map_drop). Each semantic part of the outputs has its own threshold (:func:`checks`), and the decoded
    detections are matched for every layout; a whole-output cosine is gated only on dense (yolo, no NMS)
    outputs, where it is one check among the parts.
    """
    failures = []
    par = result["parity"]
    dense_outputs = layout != "rtdetr" and ("detections" not in par or "boxes" in (par.get("parts") or {}))
    for name, m in par["outputs"].items():
        if "error" in m:
            failures.append(f"output {name}: {m['error']}")
        elif dense_outputs and m["cosine"] < thresholds["cosine_min"]:
            failures.append(f"output {name} cosine {m['cosine']:.5f} < {thresholds['cosine_min']}")
    for c in checks(par, thresholds):
        if c["value"] >= c["min"]:
            continue
        if c["part"] == "detections":
            what = {"match_rate": "detection match rate", "mean_box_iou": "mean box IoU of matched detections"}
            failures.append(f"{what[c['metric']]} {c['value']:.3f} < {c['min']}")
        elif c["part"] == "classes":
            n = par["parts"]["classes"]["anchors"]
            failures.append(f"best class kept on {c['value']:.3f} of {n} anchors the reference scores "
                            f">= {par['parts']['classes']['min_score']} < {c['min']}")
        else:
            name = "top-k scores (sorted)" if par["parts"][c["part"]].get("sorted") else PART_NAMES[c["part"]]
            failures.append(f"{name} cosine {c['value']:.5f} < {c['min']}")
    for key, limit in (("map50_drop", "map50_drop_max"), ("map_drop", "map_drop_max")):
        drop = result["accuracy"][key]
        if drop > thresholds[limit]:
            failures.append(f"{key.replace('_', ' ')} {drop:.4f} > {thresholds[limit]}")
    return failures
