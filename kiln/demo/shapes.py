"""Procedural "shapes" detection dataset, so the demo pipeline needs no downloads.

Every image holds 1..6 filled, coloured shapes (circle, square, triangle) on a
textured background (two-colour gradient, Gaussian noise, low-frequency blotches
and a few distractor lines).  The output is a COCO-format ``annotations.json``
plus PNG images, which is exactly what the rest of Kiln (calibration, accuracy
validation) consumes for real datasets.

Determinism matters: the workflow regenerates the ``val`` and ``calib`` splits on
every machine and compares accuracy against numbers recorded at training time, so
``(split, seed, num_images, image_size)`` always produces byte-identical files.
All randomness flows from one :class:`numpy.random.Generator` whose seed is derived
from both ``seed`` and ``split`` (different splits never share images), PNGs are
written by PIL with fixed settings (PIL adds no timestamp chunks) and the JSON is
serialised with a fixed key order.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

# Object size range (bounding-box side, pixels) for a 256 px image; scaled with image_size.
_MIN_SIZE = 20
_MAX_SIZE = 110
_MAX_OBJECTS = 6
# A new shape is rejected when it would hide more than this fraction of an earlier
# box (or be hidden that much itself), so every annotated box stays visibly present.
_MAX_COVER = 0.35
# Minimum Euclidean RGB distance between a shape colour and the background under it,
# otherwise an object could be invisible and its label would be noise.
_MIN_CONTRAST = 90.0


def split_seed(split: str, seed: int) -> int:
    """Derive the RNG seed of one split.

    crc32 (not ``hash()``, which is salted per process) keeps it stable across runs,
    and mixing through SeedSequence keeps e.g. ("train", 1) and ("val", 0) unrelated.
    """
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode("utf-8"))])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 (size, size, 3) background: gradient + blotches + pixel noise."""
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # Low-frequency blotches: a coarse random grid, bilinearly upsampled; cheap, and
    # it gives the detector texture to ignore rather than a trivially flat background.
    cells = 8
    coarse = rng.normal(0.0, 18.0, (cells + 1, cells + 1, 3)).astype(np.float32)
    g = coords * cells  # position in coarse-grid units, in [0, cells)
    i0 = np.minimum(g.astype(np.int64), cells - 1)
    f = (g - i0).astype(np.float32)
    rows = coarse[i0] * (1 - f)[:, None, None] + coarse[i0 + 1] * f[:, None, None]  # (size, cells+1, 3)
    blot = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]
    img = img + blot
    return img.astype(np.float32)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour that contrasts with ``under`` (mean background RGB)."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d >= _MIN_CONTRAST:
            return (int(c[0]), int(c[1]), int(c[2]))
        if d > best_d:
            best, best_d = c, d
    # Fall back to the most contrasting candidate; with 20 tries this is rare.
    assert best is not None
    return (int(best[0]), int(best[1]), int(best[2]))


def _shape_geometry(
    rng: np.random.Generator, cls: str, side: float, cx: float, cy: float
) -> tuple[list[tuple[float, float]] | None, tuple[float, float, float, float], float]:
    """Polygon (None for circles), tight box (x0, y0, x1, y1) and geometric area."""
    if cls == "circle":
        r = side / 2
        return None, (cx - r, cy - r, cx + r, cy + r), math.pi * r * r
    if cls == "square":
        # Squares get a random rotation so "square" is not just "axis-aligned box";
        # the side is chosen so the rotated square's bounding box has side `side`.
        theta = rng.uniform(0, math.pi / 2)
        a = side / (abs(math.cos(theta)) + abs(math.sin(theta)))
        verts = []
        for k in range(4):
            phi = theta + math.pi / 4 + k * math.pi / 2
            verts.append((cx + a / math.sqrt(2) * math.cos(phi), cy + a / math.sqrt(2) * math.sin(phi)))
        area = a * a
    elif cls == "triangle":
        # Roughly equilateral triangle with random rotation and mild vertex jitter.
        theta = rng.uniform(0, 2 * math.pi)
        verts = []
        for k in range(3):
            phi = theta + k * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15)
            verts.append((math.cos(phi), math.sin(phi)))
        xs = [v[0] for v in verts]
        ys = [v[1] for v in verts]
        scale = side / max(max(xs) - min(xs), max(ys) - min(ys))
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        verts = [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in verts]
        (x0, y0), (x1, y1), (x2, y2) = verts
        area = abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)) / 2
    else:
        raise ValueError(f"unknown shape class {cls!r}; expected one of {CLASS_NAMES}")
    xs = [v[0] for v in verts]
    ys = [v[1] for v in verts]
    return verts, (min(xs), min(ys), max(xs), max(ys)), area


def _covers_too_much(box: tuple[float, ...], others: list[tuple[float, ...]]) -> bool:
    """True when ``box`` and any earlier box hide too much of one another."""
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for ox0, oy0, ox1, oy1 in others:
        iw = min(x1, ox1) - max(x0, ox0)
        ih = min(y1, oy1) - max(y0, oy0)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        oarea = (ox1 - ox0) * (oy1 - oy0)
        if inter / oarea > _MAX_COVER or inter / area > _MAX_COVER:
            return True
    return False


def render_image(
    rng: np.random.Generator, image_size: int, class_names: tuple[str, ...] = CLASS_NAMES
) -> tuple[Image.Image, list[dict]]:
    """Render one image; returns it and its objects as dicts {category_index, bbox, area}.

    ``bbox`` is COCO [x, y, w, h] in pixels, ``category_index`` is 0-based into
    ``class_names`` (each name must be one of :data:`CLASS_NAMES`).
    """
    size = int(image_size)
    scale = size / 256.0
    bg = _background(rng, size)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    n_obj = int(rng.integers(1, _MAX_OBJECTS + 1))
    boxes: list[tuple[float, float, float, float]] = []
    objects: list[dict] = []
    min_side = max(4.0, _MIN_SIZE * scale)
    max_side = min(_MAX_SIZE * scale, size * 0.9)
    for _ in range(n_obj):
        for _attempt in range(30):
            ci = int(rng.integers(0, len(class_names)))
            # Log-uniform size: equal share of small and large objects.
            side = float(math.exp(rng.uniform(math.log(min_side), math.log(max_side))))
            half = side / 2
            cx = float(rng.uniform(half + 1, size - half - 1))
            cy = float(rng.uniform(half + 1, size - half - 1))
            verts, box, area = _shape_geometry(rng, class_names[ci], side, cx, cy)
            if _covers_too_much(box, boxes):
                continue
            ix0, iy0 = max(int(box[0]), 0), max(int(box[1]), 0)
            ix1, iy1 = min(int(math.ceil(box[2])), size), min(int(math.ceil(box[3])), size)
            under = bg[iy0:iy1, ix0:ix1].reshape(-1, 3).mean(axis=0)
            colour = _pick_colour(rng, under)
            if verts is None:
                draw.ellipse(box, fill=colour)
            else:
                draw.polygon(verts, fill=colour)
            boxes.append(box)
            x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
            x1, y1 = min(box[2], float(size)), min(box[3], float(size))
            objects.append(
                {
                    "category_index": ci,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(float(area), 2),
                }
            )
            break

    # Distractor lines after the shapes: thin, so they cross objects without hiding them.
    for _ in range(int(rng.integers(2, 6))):
        p = rng.uniform(0, size, 4)
        c = rng.integers(0, 256, 3)
        draw.line(
            [(float(p[0]), float(p[1])), (float(p[2]), float(p[3]))],
            fill=(int(c[0]), int(c[1]), int(c[2])),
            width=int(rng.integers(1, 3)),
        )

    # Pixel noise over everything (shapes included) so object interiors are not flat.
    sigma = float(rng.uniform(4.0, 16.0))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, (size, size, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img, objects


def generate_split(
    out_dir: Path,
    split: str,
    num_images: int,
    seed: int,
    image_size: int = 256,
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> Path:
    """Write ``out_dir/images/<split>_%06d.png`` and ``out_dir/annotations.json``.

    Returns the annotations path.  Category ids start at 1 (COCO convention), image
    and annotation ids at 1 as well (pycocotools treats id 0 oddly in places).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    unknown = [c for c in class_names if c not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}; choose from {CLASS_NAMES}")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(split_seed(split, seed))

    images: list[dict] = []
    annotations: list[dict] = []
    ann_id = 1
    for i in range(num_images):
        img, objects = render_image(rng, image_size, tuple(class_names))
        file_name = f"{split}_{i:06d}.png"
        # Fixed compress_level/optimize so the bytes only depend on the pixels.
        img.save(img_dir / file_name, format="PNG", compress_level=6, optimize=False)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": int(image_size), "height": int(image_size)})
        for obj in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": obj["category_index"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
            ann_id += 1

    coco = {
        "info": {"description": f"Kiln demo shapes, split={split} seed={seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(class_names)],
    }
    ann_path = out_dir / "annotations.json"
    ann_path.write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    return ann_path
