"""Stage `dataset`: one split as COCO JSON, generated (demo) or selected from the user's files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from kiln.coco import IMAGE_DIR_KEY
from kiln.errors import KilnError
from kiln.specs import DatasetSpec
from kiln.util import write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def params(cfg, dataset: str, split: str) -> dict:
    d = cfg.datasets[dataset]
    if d.generator:
        count = d.calib_count if split == "calib" else d.val_count
        return {"generator": d.generator, "seed": d.seed, "image_size": d.image_size, "count": count}
    if split == "calib":
        return {"images": d.calib_images, "count": d.calib_count}
    return {"images": d.val_images, "annotations": d.val_annotations, "count": d.val_count}


# Dataset generators (`datasets.<name>.generator`), each a module with generate_split(out, split, count,
# seed, image_size), imported by name: the dataset stage's code fingerprint covers the one a dataset uses.
GENERATORS = {"shapes": "kiln.demo.shapes"}


def generator(name: str):
    """The generator module registered under `name`."""
    import importlib

    return importlib.import_module(GENERATORS[name])


def prepare(spec: DatasetSpec, split: str, out: str | Path) -> Path:
    """Write `out` (annotations.json of one split); generated images go to images/ beside it."""
    out = Path(out)
    if spec.generator:
        count = spec.calib_count if split == "calib" else spec.val_count
        log.info("dataset %s/%s: generating %d images (seed %d)", spec.name, split, count, spec.seed)
        # Generate into a sibling folder and swap it in, so a killed job leaves no half split.
        tmp = out.parent.with_name(out.parent.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generator(spec.generator).generate_split(tmp, split, count, seed=spec.seed, image_size=spec.image_size)
        shutil.rmtree(out.parent, ignore_errors=True)
        os.replace(tmp, out.parent)
        return out
    # images/ stays empty (a declared output): the annotations name the dataset's own image folder.
    (out.parent / "images").mkdir(parents=True, exist_ok=True)
    if split == "calib":
        return _calib_from_folder(spec, out)
    return _val_from_coco(spec, out)


def _calib_from_folder(spec: DatasetSpec, out: Path) -> Path:
    folder = Path(spec.calib_images)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KilnError(f"'datasets.{spec.name}.calib.images': no .jpg/.png images in '{folder}'")
    files = files[: spec.calib_count]
    from PIL import Image

    images = []
    for i, f in enumerate(files, start=1):
        with Image.open(f) as im:
            images.append({"id": i, "file_name": f.name, "width": im.width, "height": im.height})
    write_json(out, {IMAGE_DIR_KEY: str(folder.resolve()), "images": images, "annotations": [], "categories": []})
    return out


def _val_from_coco(spec: DatasetSpec, out: Path) -> Path:
    path = Path(spec.val_annotations)
    try:
        coco = json.loads(path.read_text())
        images = sorted(coco["images"], key=lambda im: im["id"])[: spec.val_count]
        categories = coco["categories"]
        keep = {im["id"] for im in images}
        annotations = [a for a in coco["annotations"] if a["image_id"] in keep]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise KilnError(
            f"'datasets.{spec.name}.val.annotations': '{path}' is not COCO detection JSON "
            f"({type(err).__name__}: {err}): it needs images, annotations and categories"
        ) from None
    folder = Path(spec.val_images)
    missing = [im["file_name"] for im in images if not (folder / im["file_name"]).is_file()]
    if missing:
        raise KilnError(
            f"'datasets.{spec.name}.val.images': {len(missing)} images of '{path}' are not in '{folder}' "
            f"(e.g. {missing[0]}): point val.images at the folder holding them"
        )
    write_json(
        out,
        {IMAGE_DIR_KEY: str(folder.resolve()), "images": images, "annotations": annotations, "categories": categories},
    )
    return out


def run_rule(cfg, job) -> None:
    """Rule `dataset`: one split of a dataset."""
    prepare(cfg.datasets[job.wildcards.dataset], job.wildcards.split, job.output[0])
