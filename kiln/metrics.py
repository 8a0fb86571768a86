"""COCO mAP through pycocotools, the yardstick every Kiln variant is judged with."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def detections_to_coco(image_ids: Sequence[int], detections: Sequence[dict], category_ids: Sequence[int]) -> list[dict]:
    """COCO result records from per-image detection dicts (0-based ``labels``).

    ``category_ids[label]`` gives the dataset's category id (COCO ids are not
    contiguous, e.g. 1..90 with gaps for COCO itself).
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection entries; they must pair up")
    cat = np.asarray(list(category_ids), dtype=np.int64)
    records: list[dict] = []
    for image_id, det in zip(image_ids, detections):
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(cat)):
            raise ValueError(
                f"detection label {int(labels.max())} outside 0..{len(cat) - 1}; "
                "the model's class count does not match the dataset categories"
            )
        for (x0, y0, x1, y1), s, lab in zip(boxes, scores, labels):
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat[lab]),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(s),
                }
            )
    return records


def coco_map(
    annotations_json: Path,
    image_ids: list[int],
    detections: list[dict],
    category_ids: list[int],
) -> dict[str, float]:
    """COCO bbox mAP over ``image_ids``: {"map50_95": ..., "map50": ...}.

    ``detections[i]`` belongs to ``image_ids[i]``.  No detections at all gives 0.0
    (pycocotools' loadRes would crash on an empty list).  pycocotools prints its
    progress to stdout; that is swallowed so it does not interleave with Kiln's logs.
    """
    # Imported here so modules that only need detections_to_coco do not need pycocotools.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    records = detections_to_coco(image_ids, detections, category_ids)
    if not records:
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations_json))
        dt = gt.loadRes(records)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = [int(i) for i in image_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats are -1 when there is no ground truth to evaluate against; report 0.
    return {"map50_95": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0)}
