"""A few validation images with an engine's detections drawn, written as PNG beside validation.json.

Drawn by kiln.draw (as `kiln predict` draws): boxes on the original image, in a colour derived from
the class name, labelled "<class> <score>". Class names come from the dataset's COCO categories:
label i is the i-th category by id, as in kiln.metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln import paths
from kiln.draw import class_colour, draw
from kiln.util import atomic_path

__all__ = ["DEFAULT_COUNT", "class_colour", "class_names", "draw", "file_name", "write"]

DEFAULT_COUNT = 4


def class_names(annotations: str | Path) -> list[str]:
    """Category names in label order (categories sorted by id)."""
    cats = sorted(json.loads(Path(annotations).read_text())["categories"], key=lambda c: c["id"])
    return [str(c.get("name", c["id"])) for c in cats]


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
