"""A few validation images with an engine's detections drawn, written as PNG beside validation.json.

Boxes are drawn on the original image (detections are in original pixels), in a colour derived
from a hash of the class name (stable across runs, processes and models), with a label
"<class> <score>" on a filled tab of the same colour. Class names come from the dataset's COCO
categories: label i is the i-th category by id, as in kiln.metrics.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path

import numpy as np

from kiln import paths
from kiln.util import atomic_path

DEFAULT_COUNT = 4
MAX_DRAWN = 100  # per image, highest scores first


def class_colour(name: str) -> tuple[int, int, int]:
    """RGB colour of a class: hue from an MD5 of its name (not Python's salted hash), bright and saturated."""
    digest = hashlib.md5(name.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    sat = 0.65 + 0.3 * digest[2] / 255.0
    val = 0.8 + 0.2 * digest[3] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def class_names(annotations: str | Path) -> list[str]:
    """Category names in label order (categories sorted by id)."""
    cats = sorted(json.loads(Path(annotations).read_text())["categories"], key=lambda c: c["id"])
    return [str(c.get("name", c["id"])) for c in cats]


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


def file_name(image_id: int) -> str:
    """A picture's file name beside validation.json (the last part of paths.PICTURE)."""
    return Path(paths.PICTURE).name.format(image_id=int(image_id))


def write(folder: str | Path, annotations: str | Path, image_ids, dets: list[dict], count: int = DEFAULT_COUNT,
          min_score: float = 0.3) -> list[str]:
    """Draw the first `count` images' detections into `folder` (validation.json's); returns the PNG paths.

    `image_ids[i]` and `dets[i]` belong together (as in the accuracy pass).
    """
    from PIL import Image

    from kiln.coco import image_dir

    data = json.loads(Path(annotations).read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    images = image_dir(annotations)
    names = class_names(annotations)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id, d in list(zip(image_ids, dets))[:count]:
        with Image.open(images / files[int(image_id)]) as raw:
            picture = draw(raw, d, names, min_score)
        out = folder / file_name(image_id)
        with atomic_path(out) as tmp:
            picture.save(tmp, format="PNG")
        written.append(str(out))
    return written
