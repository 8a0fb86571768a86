"""Preprocessing of one image for a model: letterbox (YOLO) or plain resize (RT-DETR), as uint8 HWC.

Shared by the stage that preprocesses the splits (kiln.inputs) and by everything that preprocesses an
image the same way afterwards (the end-to-end pipeline latency), so the accuracy that was validated
is the accuracy of every later path.

Two resize backends (``models.<name>.resize_backend``, defaulted per source by kiln.config):

* ``pil``: PIL's bilinear resize (sources torch and rtdetr, the demo);
* ``cv2``: OpenCV's ``INTER_LINEAR``, as Ultralytics' ``LetterBox`` (ultralytics/data/augment.py)
  resizes for prediction and export (source ultralytics). The two differ by up to tens of grey levels
  on real photos; on an image that needs no resize they are the same.

Both pad with grey 114 and place the image with Ultralytics' rounding (size ``round(side * r)``,
offsets ``round(pad / 2 - 0.1)``), so boxes map back the same way.
"""

from __future__ import annotations

import numpy as np

PAD_VALUE = 114  # Ultralytics' letterbox grey
RESIZE_BACKENDS = ("pil", "cv2")


def _geometry(width: int, height: int, size: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """Ratio, resized (w, h) and the (left, top) offset of an image letterboxed into `size` (h, w)."""
    h, w = size
    r = min(h / height, w / width)
    nw, nh = max(round(width * r), 1), max(round(height * r), 1)
    left, top = int(round((w - nw) / 2 - 0.1)), int(round((h - nh) / 2 - 0.1))
    return r, nw, nh, left, top


def letterbox(img, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio (PIL bilinear) and pad to `size` (h, w); returns HWC uint8, ratio, (left, top)."""
    from PIL import Image

    h, w = size
    r, nw, nh, left, top = _geometry(img.width, img.height, size)
    canvas = Image.new("RGB", (w, h), (PAD_VALUE,) * 3)
    resized = img if (nw, nh) == img.size else img.resize((nw, nh), Image.BILINEAR)
    canvas.paste(resized, (left, top))
    return np.asarray(canvas), r, (left, top)


def resize(img, size: tuple[int, int]) -> np.ndarray:
    """Stretch to `size` (h, w) with PIL bilinear; HWC uint8."""
    from PIL import Image

    h, w = size
    return np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR))


def _cv2():
    from kiln.errors import KilnError

    try:
        import cv2
    except ImportError as err:
        raise KilnError(f"resize_backend cv2 needs OpenCV ({err}): pip install opencv-python-headless, "
                        f"or set the model's 'resize_backend: pil'") from None
    return cv2


def letterbox_cv2(img, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """As :func:`letterbox`, resized by OpenCV's INTER_LINEAR and padded by copyMakeBorder, as Ultralytics does."""
    cv2 = _cv2()
    h, w = size
    r, nw, nh, left, top = _geometry(img.width, img.height, size)
    arr = np.asarray(img)
    if (nw, nh) != img.size:
        arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(arr, top, h - nh - top, left, w - nw - left, cv2.BORDER_CONSTANT,
                             value=(PAD_VALUE,) * 3)
    return out, r, (left, top)


def resize_cv2(img, size: tuple[int, int]) -> np.ndarray:
    """Stretch to `size` (h, w) with OpenCV's INTER_LINEAR (Ultralytics' RT-DETR: LetterBox scale_fill)."""
    cv2 = _cv2()
    h, w = size
    arr = np.asarray(img)
    return arr if img.size == (w, h) else cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)


def prepare(spec, img) -> tuple[np.ndarray, float, tuple[float, float]]:
    """One RGB PIL image as the model `spec` takes it: HWC uint8, ratio and (left, top) pad of the letterbox."""
    cv = getattr(spec, "resize_backend", "pil") == "cv2"
    if spec.preprocess == "letterbox":
        return (letterbox_cv2 if cv else letterbox)(img, spec.input_size)
    return (resize_cv2 if cv else resize)(img, spec.input_size), 1.0, (0.0, 0.0)
