"""Detections drawn on their image: a box and a "<class> <score>" tab per detection, one colour per class.

The colour comes from an MD5 of the class name (not Python's salted hash), so a class keeps its colour
across runs, processes, models and pictures. Shared by the validation pictures (kiln.validate.pictures)
and `kiln predict` (kiln.predict).
"""

from __future__ import annotations

import colorsys
import hashlib

import numpy as np

MAX_DRAWN = 100  # per image, highest scores first


def class_colour(name: str) -> tuple[int, int, int]:
    """RGB colour of a class: hue from an MD5 of its name (not Python's salted hash), bright and saturated."""
    digest = hashlib.md5(name.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    sat = 0.65 + 0.3 * digest[2] / 255.0
    val = 0.8 + 0.2 * digest[3] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw(image, dets: dict, names: list[str], min_score: float = 0.3):
    """A copy of `image` (PIL, RGB) with the detections scoring >= min_score drawn on it."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    canvas = ImageDraw.Draw(img)
    w, h = img.size
    line = max(2, round(min(w, h) / 160))
    font = _font(max(10, round(min(w, h) / 28)))
    scores = np.asarray(dets["scores"], dtype=np.float32)
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= min_score][:MAX_DRAWN]
    # Lowest score first, so the most confident boxes end up on top.
    for i in reversed(order):
        x0, y0, x1, y1 = (float(v) for v in dets["boxes"][i])
        label = int(dets["labels"][i])
        name = names[label] if 0 <= label < len(names) else f"class {label}"
        colour = class_colour(name)
        canvas.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        text = f"{name} {scores[i]:.2f}"
        tx0, ty0, tx1, ty1 = canvas.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        pad = max(1, line // 2)
        top = y0 - th - 2 * pad if y0 - th - 2 * pad >= 0 else y0  # above the box, or inside at the top edge
        left = min(max(0.0, x0), max(0.0, w - tw - 2 * pad))
        canvas.rectangle([left, top, left + tw + 2 * pad, top + th + 2 * pad], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        canvas.text((left + pad - tx0, top + pad - ty0), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                    font=font)
    return img
