"""Preprocessing of one image for a model: letterbox (YOLO) or plain resize (RT-DETR), as uint8 HWC.

Shared by the stage that preprocesses the splits (kiln.inputs) and by everything that preprocesses an
image the same way afterwards (the end-to-end pipeline latency), so the accuracy that was validated
is the accuracy of every later path.
"""

from __future__ import annotations

import numpy as np

PAD_VALUE = 114  # Ultralytics' letterbox grey


def letterbox(img, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad to `size` (h, w); returns HWC uint8, ratio, (left, top) offset."""
    from PIL import Image

    h, w = size
    r = min(h / img.height, w / img.width)
    nw, nh = round(img.width * r), round(img.height * r)
    # Same rounding as Ultralytics, so boxes map back identically.
    left, top = int(round((w - nw) / 2 - 0.1)), int(round((h - nh) / 2 - 0.1))
    canvas = Image.new("RGB", (w, h), (PAD_VALUE,) * 3)
    resized = img if (nw, nh) == img.size else img.resize((nw, nh), Image.BILINEAR)
    canvas.paste(resized, (left, top))
    return np.asarray(canvas), r, (left, top)


def resize(img, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    return np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR))
