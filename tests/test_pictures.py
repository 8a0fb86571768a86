"""Pictures of an engine's detections: class colours, drawing, and files beside validation.json."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from kiln.validate.pictures import class_colour, class_names, draw, write
from tests.conftest import REPO

GREY = (40, 40, 40)


def test_class_colour_is_stable_across_processes_and_distinct():
    names = ["circle", "square", "triangle", "person", "car"]
    here = [class_colour(n) for n in names]
    code = f"import json; from kiln.validate.pictures import class_colour; print(json.dumps([class_colour(n) for n in {names!r}]))"
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=REPO).stdout)
    assert [tuple(c) for c in other] == here  # an MD5 of the name, not Python's per-process salted hash()
    assert len(set(here)) == len(here)
    assert all(0 <= ch <= 255 for c in here for ch in c) and all(max(c) >= 200 for c in here)  # bright


def _dets(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64)}


def test_draw_puts_box_and_label_in_the_class_colour():
    img = Image.new("RGB", (200, 160), GREY)
    dets = _dets([[50, 60, 150, 140], [10, 10, 30, 30]], [0.9, 0.1], [1, 0])
    out = draw(img, dets, ["circle", "square"], min_score=0.3)
    colour = class_colour("square")
    assert out.size == img.size and img.getpixel((50, 100)) == GREY  # the input is left alone
    assert out.getpixel((50, 100)) == colour and out.getpixel((150, 100)) == colour  # left and right edges
    assert out.getpixel((100, 60)) == colour and out.getpixel((100, 140)) == colour  # top and bottom edges
    assert out.getpixel((100, 100)) == GREY  # boxes are outlines
    # The label sits on a filled tab of the same colour just above the box, with its text in it.
    tab = np.asarray(out)[40:60, 50:110]
    filled = (tab == colour).all(axis=-1).mean()
    assert 0.3 < filled < 1.0
    assert out.getpixel((20, 20)) == GREY  # the 0.1 detection is below min_score: not drawn


def test_label_goes_inside_a_box_at_the_top_edge():
    out = draw(Image.new("RGB", (120, 120), GREY), _dets([[20, 0, 100, 80]], [0.8], [0]), ["circle"])
    assert out.getpixel((22, 3)) != GREY and out.getpixel((60, 40)) == GREY


def test_write_draws_the_first_images_beside_validation_json(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(5):
        Image.new("RGB", (64 + 8 * i, 48), GREY).save(images / f"im{i}.png")
        records.append({"id": 10 + i, "file_name": f"im{i}.png", "width": 64 + 8 * i, "height": 48})
    ann = tmp_path / "data" / "annotations.json"
    ann.write_text(json.dumps({"images": records, "annotations": [],
                               "categories": [{"id": 7, "name": "triangle"}, {"id": 3, "name": "circle"}]}))
    assert class_names(ann) == ["circle", "triangle"]  # label order: categories by id
    dets = [_dets([[5, 5, 40, 40]], [0.95], [1]) for _ in range(5)]
    folder = tmp_path / "validation" / "cpu" / "m" / "fp32"
    written = write(folder, ann, [10, 11, 12, 13, 14], dets, count=4)
    assert [p.rsplit("/", 1)[-1] for p in written] == [f"detections_{i}.png" for i in (10, 11, 12, 13)]
    for i, path in enumerate(written):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64 + 8 * i, 48)
            assert im.convert("RGB").getpixel((5, 20)) == class_colour("triangle")  # label 1 -> id 7
    assert not list(folder.glob("*.tmp.png"))
