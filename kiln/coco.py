"""A dataset split as the `dataset` stage writes it (COCO JSON): where its images are. Shared by the stages that read splits."""

from __future__ import annotations

import json
from pathlib import Path

# Key Kiln adds to a split's JSON when the images live elsewhere than images/ beside it.
IMAGE_DIR_KEY = "kiln_image_dir"


def image_dir(annotations: str | Path) -> Path:
    """Folder that holds the images of a split written by the `dataset` stage."""
    annotations = Path(annotations)
    data = json.loads(annotations.read_text())
    return Path(data.get(IMAGE_DIR_KEY) or annotations.parent / "images")


def categories(annotations: str | Path) -> list[dict]:
    """A split's categories in label order (sorted by id, as kiln.metrics maps labels): {"id", "name"} each."""
    cats = sorted(json.loads(Path(annotations).read_text())["categories"], key=lambda c: c["id"])
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
