"""A preprocessed split as the `inputs` stage writes it (.npz), loaded, and run through an engine in batches;
and decoded images preprocessed the same way (:func:`from_images`).

Shared by the stages that read preprocessed inputs (reference, quantize, build's calibrator, validate,
baseline) and by kiln.runtime: below all of them, so none imports another stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.preprocess import prepare
from kiln.specs import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """A preprocessed split, loaded."""

    images: np.ndarray  # uint8 NCHW
    image_ids: np.ndarray
    orig_sizes: np.ndarray  # (N, 2) width, height
    ratios: np.ndarray
    pads: np.ndarray  # (N, 2) letterbox left, top offsets in input pixels

    def __len__(self) -> int:
        return len(self.images)

    def feeds(self, spec: ModelSpec, start: int, stop: int) -> dict[str, np.ndarray]:
        """Model inputs for images [start, stop): floats in [0, 1], plus orig_target_sizes for RT-DETR."""
        feeds = {"images": self.images[start:stop].astype(np.float32) / 255.0}
        if spec.layout == "rtdetr":
            feeds["orig_target_sizes"] = self.orig_sizes[start:stop].astype(np.int64)
        return feeds


def from_images(spec: ModelSpec, images: list) -> tuple[dict[str, np.ndarray], Inputs]:
    """Model feeds for a batch of PIL RGB images, and what decoding needs to map boxes back.

    The pixels are the inputs stage's (kiln.preprocess letterbox or resize, uint8) and the feeds
    :meth:`Inputs.feeds`'s (float32 in [0, 1], NCHW; orig_target_sizes for RT-DETR).
    """
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


def load(path: str | Path) -> Inputs:
    with np.load(path) as z:
        return Inputs(**{k: z[k] for k in ("images", "image_ids", "orig_sizes", "ratios", "pads")})


def run_batches(infer, spec, inputs, batch_size: int) -> dict[str, np.ndarray]:
    """Run `infer(feeds)` over all inputs in batches and stack each output along the batch axis."""
    if not spec.dynamic_batch:
        batch_size = 1
    chunks: dict[str, list[np.ndarray]] = {}
    n = len(inputs)
    for start in range(0, n, batch_size):
        out = infer(inputs.feeds(spec, start, min(n, start + batch_size)))
        for name, value in out.items():
            chunks.setdefault(name, []).append(np.asarray(value))
        done = min(n, start + batch_size)
        if done % (batch_size * 25) == 0 or done == n:
            log.info("%s: %d/%d images", spec.name, done, n)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
