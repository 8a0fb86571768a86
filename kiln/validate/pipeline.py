"""End-to-end detection latency: preprocessing + engine + decode/NMS, timed on the host.

A query takes decoded RGB images at their original size (file decoding is not timed: a camera or
video decoder hands frames over already decoded), letterboxes or resizes them exactly as the
inputs stage does, normalises to float [0, 1] NCHW, runs the engine, and turns its outputs into
detections in original pixels exactly as the accuracy pass does (kiln.accuracy). Marks
split each query into ``preprocess``, ``engine`` and ``postprocess`` phases.

The host timer serves every backend: for a GPU engine the engine phase includes its copies and
the wait for its result, as an application sees it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln import latency
from kiln.accuracy import detections
from kiln.batches import Inputs
from kiln.preprocess import prepare
from kiln.specs import ModelSpec


def load_images(annotations: str | Path, count: int) -> list:
    """The first `count` images of a split (by id), decoded to RGB and kept in memory."""
    from PIL import Image

    from kiln.coco import image_dir

    data = json.loads(Path(annotations).read_text())
    folder = image_dir(annotations)
    out = []
    for im in sorted(data["images"], key=lambda im: im["id"])[:count]:
        with Image.open(folder / im["file_name"]) as raw:
            rgb = raw.convert("RGB")
            rgb.load()
        out.append(rgb)
    return out


def preprocess(spec: ModelSpec, images: list) -> tuple[dict[str, np.ndarray], Inputs]:
    """Model feeds for a batch of PIL images, and what decoding needs to map boxes back."""
    arrays, ratios, pads = [], [], []
    for img in images:
        arr, r, pad = prepare(spec, img)
        arrays.append(arr)
        ratios.append(r)
        pads.append(pad)
    batch = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    sizes = np.array([img.size for img in images], dtype=np.int64)
    meta = Inputs(images=np.empty((len(images), 0), dtype=np.uint8), image_ids=np.arange(len(images)),
                  orig_sizes=sizes, ratios=np.array(ratios, dtype=np.float64), pads=np.array(pads, dtype=np.float64))
    feeds = {"images": np.ascontiguousarray(batch)}
    if spec.layout == "rtdetr":
        feeds["orig_target_sizes"] = sizes.copy()
    return feeds, meta


def make_step(spec: ModelSpec, infer: Callable[[dict], dict], images: list,
              mark: Callable[[str], None] = lambda name: None) -> Callable[[], list[dict]]:
    """One end-to-end query over `images`: preprocess, mark, infer, mark, decode, mark."""

    def step() -> list[dict]:
        feeds, meta = preprocess(spec, images)
        mark("preprocess")
        outputs = infer(feeds)
        mark("engine")
        dets = detections(spec, outputs, meta)
        mark("postprocess")
        return dets

    return step


def measure(spec: ModelSpec, infer: Callable[[dict], dict], images: list, batch_sizes, L: dict) -> list[dict]:
    """End-to-end latency per batch size (images repeated when the split has fewer), host-timed."""
    out = []
    for bs in batch_sizes:
        if not spec.dynamic_batch and bs != 1:
            continue
        batch = [images[i % len(images)] for i in range(bs)]
        timer = latency.HostTimer()
        stats = latency.measure(make_step(spec, infer, batch, timer.mark), bs, L["warmup_ms"], L["min_iterations"],
                                L["min_seconds"], L["cv_warn_percent"], timer=timer)
        out.append(stats.to_dict())
    return out
