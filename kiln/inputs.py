"""Stage `inputs`: a split's images preprocessed for one model, stored once as uint8.

Storing the letterboxed/resized pixels (not floats) keeps the file 4x smaller and
exact: every backend reads identical bytes and divides by 255 itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from kiln.coco import image_dir
from kiln.errors import KilnError
from kiln.preprocess import prepare
from kiln.specs import ModelSpec
from kiln.util import atomic_path

log = logging.getLogger(__name__)


def params(cfg, model: str, split: str) -> dict:
    m = cfg.models[model]
    count = m.calibration["images"] if split == "calib" else cfg.datasets[m.dataset].val_count
    out = {"input_size": list(m.input_size), "preprocess": m.preprocess, "count": count}
    if m.resize_backend != "pil":  # PIL's params as before the key existed: its inputs are not remade
        out["resize_backend"] = m.resize_backend
    return out


def preprocess_split(spec: ModelSpec, annotations: str | Path, count: int, out: str | Path) -> Path:
    """Preprocess the first `count` images of a split for `spec` into `out` (.npz)."""
    from PIL import Image

    data = json.loads(Path(annotations).read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:count]
    if len(images) < count:
        raise KilnError(f"'{annotations}' has {len(images)} images but {count} are needed for model '{spec.name}'")
    folder = image_dir(annotations)
    pixels, ids, sizes, ratios, pads = [], [], [], [], []
    for i, im in enumerate(images):
        path = folder / im["file_name"]
        try:
            with Image.open(path) as raw:
                rgb = raw.convert("RGB")
        except OSError as err:
            raise KilnError(f"image '{path}' cannot be read ({err}): replace or remove it") from None
        arr, r, pad = prepare(spec, rgb)
        pixels.append(arr.transpose(2, 0, 1))
        ids.append(im["id"])
        sizes.append((rgb.width, rgb.height))
        ratios.append(r)
        pads.append(pad)
        if (i + 1) % 100 == 0:
            log.info("inputs %s: %d/%d images", spec.name, i + 1, len(images))
    with atomic_path(out, suffix=".tmp.npz") as tmp:
        np.savez(
            tmp,
            images=np.stack(pixels).astype(np.uint8),
            image_ids=np.array(ids, dtype=np.int64),
            orig_sizes=np.array(sizes, dtype=np.int64),
            ratios=np.array(ratios, dtype=np.float64),
            pads=np.array(pads, dtype=np.float64),
        )
    log.info("inputs %s: %d images of %s -> %s", spec.name, len(images), annotations, out)
    return Path(out)


def run_rule(cfg, job) -> None:
    """Rule `inputs`: one split preprocessed for one model."""
    preprocess_split(cfg.models[job.wildcards.model], job.input.annotations, job.params.spec["count"], job.output[0])
