"""`kiln predict ENGINE_DIR INPUT... --out DIR`: an engine folder run on images, folders and videos.

Each input is an image file, a video file (decoded and written with OpenCV), or a folder of them
(searched recursively, in sorted order). For each image it writes the picture with its detections
drawn (kiln.draw: a colour per class name, "<class> <score>" labels; detections scoring below
``--min-score`` are not drawn) under DIR, at its path relative to the folder it came from (an image
given directly: its own name); for each video, the video with every frame annotated (``.mp4``). And:

- ``DIR/detections.json``: every detection in COCO results format (``image_id``, ``category_id``,
  ``bbox`` [x, y, w, h] in original pixels, ``score``), all of those above the model's
  ``decode.conf_threshold``, as validation scores them;
- ``DIR/images.json``: each ``image_id`` with its file (and frame, for a video) and size.

Image ids: when the only input is a split's image folder with its annotations.json beside it (as the
`dataset` stage writes ``results/data/DATASET/SPLIT/images``) and every image in it is listed there,
the split's own ids and category ids, so the file scores against those annotations; otherwise
1, 2, ... in input order (video frames included) and the engine's category ids (those of the split it
was validated on; the 0-based class index where it had none).

Progress goes to stderr as a bar, then the images per second of the whole run (reading, preprocessing,
the engine, decoding, drawing and writing). An input that cannot be read is one line on stderr and is
skipped; the others are written, and the command exits 1 naming how many were skipped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kiln import coco
from kiln.draw import draw
from kiln.errors import KilnError
from kiln.metrics import detections_to_coco
from kiln.runtime import Detector, read_rgb
from kiln.util import atomic_path, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
RESULTS_FILE = "detections.json"
IMAGES_FILE = "images.json"
SPLIT_ANNOTATIONS = "annotations.json"
MIN_SCORE = 0.3  # drawn, as on validation's pictures


@dataclass
class Item:
    """One input file and where its annotated copy goes (relative to DIR)."""

    path: Path
    out: Path
    video: bool


def collect(inputs: list[str | Path]) -> list[Item]:
    """The image and video files of the inputs, in order, each with its output name; one line per mistake."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if not found:
                raise KilnError(f"input folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}) or videos "
                                f"({', '.join(VIDEO_SUFFIXES)})")
            items += [Item(p, p.relative_to(path), p.suffix.lower() in VIDEO_SUFFIXES) for p in found]
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
                raise KilnError(f"input '{path}' is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a video "
                                f"({', '.join(VIDEO_SUFFIXES)}): rename it or leave it out")
            items.append(Item(path, Path(path.name), path.suffix.lower() in VIDEO_SUFFIXES))
        else:
            raise KilnError(f"input '{path}' does not exist: pass image files, video files or folders of them")
    for item in items:
        if item.video:
            item.out = item.out.with_suffix(".mp4")
    seen: dict[Path, Path] = {}
    for item in items:
        if item.out in seen:
            raise KilnError(f"inputs '{seen[item.out]}' and '{item.path}' would both be written as '{item.out}': "
                            f"predict them into separate --out folders")
        seen[item.out] = item.path
    return items


def split_of(inputs: list[str | Path], items: list[Item]) -> tuple[dict[str, int], list[int]] | None:
    """(file name -> image id, category ids) of the split whose image folder is the one input, else None."""
    if len(inputs) != 1 or not Path(inputs[0]).is_dir() or any(i.video for i in items):
        return None
    folder = Path(inputs[0])
    annotations = folder.parent / SPLIT_ANNOTATIONS
    if not annotations.is_file():
        return None
    try:
        if coco.image_dir(annotations).resolve() != folder.resolve():
            return None
        data = json.loads(annotations.read_text())
        ids = {str(im["file_name"]): int(im["id"]) for im in data["images"]}
        cats = [c["id"] for c in coco.categories(annotations)]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a split Kiln can read: number the images instead
    if not all(i.out.as_posix() in ids for i in items):
        return None
    return ids, cats


class Progress:
    """A one-line progress bar on stderr: done/total images, and images/s so far."""

    WIDTH = 30

    def __init__(self, total: int | None, stream=None, enabled: bool = True):
        self.total, self.done, self.stream, self.enabled = total, 0, stream or sys.stderr, enabled
        self.start = self._last = time.perf_counter()
        self._shown = -1  # the count last drawn

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 0.2 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._shown = self.done
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            filled = round(self.WIDTH * min(self.done, self.total) / self.total)
            bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done}"
        self.stream.write(f"\rkiln predict {bar} images, {rate:.1f} images/s")
        self.stream.flush()

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            if self._shown != self.done:
                self._draw(time.perf_counter())
            self.stream.write("\n")
        return elapsed


def _save_picture(picture, dst: Path) -> None:
    from PIL import Image

    fmt = Image.registered_extensions().get(dst.suffix.lower(), "PNG")
    with atomic_path(dst, suffix=".tmp" + dst.suffix) as tmp:
        picture.save(tmp, format=fmt)


def _frame_count(path: Path) -> int | None:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    return n if n > 0 else None


def run(engine_dir: str | Path, inputs: list[str | Path], out: str | Path, batch_size: int | None = None,
        min_score: float = MIN_SCORE, threads: int = 0, progress: bool = True, stderr=None) -> dict:
    """Predict on every input into `out`; returns counts (images, skipped, seconds, images_per_s) and the files."""
    stderr = stderr or sys.stderr
    items = collect(inputs)
    detector = Detector.load(engine_dir, threads=threads, batch_size=batch_size)
    out = Path(out)
    split = split_of(inputs, items)
    category_ids = split[1] if split else [c["id"] for c in detector.categories]
    names = detector.class_names
    counts = [1 if not i.video else _frame_count(i.path) for i in items]
    bar = Progress(None if None in counts else sum(counts), stream=stderr, enabled=progress)
    records: list[dict] = []
    images: list[dict] = []
    skipped: list[str] = []
    next_id = [1]

    def image_id(item: Item) -> int:
        if split:
            return split[0][item.out.as_posix()]
        next_id[0] += 1
        return next_id[0] - 1

    def report(problem: str) -> None:
        skipped.append(problem)
        stderr.write(("\n" if progress else "") + f"kiln: predict: skipped: {problem}\n")

    def emit(entries: list[tuple[Item, object, int | None]]) -> list:
        """Predict a batch of (item, PIL image, frame) and record its detections; returns the pictures drawn."""
        dets = detector.predict([img for _, img, _ in entries])
        drawn = []
        for (item, img, frame), d in zip(entries, dets):
            iid = image_id(item)
            entry = {"id": iid, "file_name": str(item.path), "width": d.image_size[0], "height": d.image_size[1]}
            if frame is not None:
                entry["frame"] = frame
            images.append(entry)
            # No categories known: the 0-based class index is the category id.
            cats = category_ids or range(int(d.class_ids.max(initial=-1)) + 1)
            records.extend(detections_to_coco([iid], [d.as_labels()], cats))
            drawn.append(draw(img, d.as_labels(), names, min_score))
        bar.update(len(entries))
        return drawn

    batch: list[tuple[Item, object, int | None]] = []

    def flush() -> None:
        for (item, _, _), picture in zip(batch, emit(batch)):
            _save_picture(picture, out / item.out)
        batch.clear()


    for item in items:
        if item.video:
            flush()
            _video(item, out / item.out, detector, emit, report)
            continue
        try:
            img = read_rgb(item.path)
        except KilnError as err:
            report(str(err).removesuffix(": replace or remove it"))
            bar.update(1)
            continue
        batch.append((item, img, None))
        if len(batch) >= detector.max_batch:
            flush()
    flush()
    detector.close()
    seconds = bar.finish()
    write_json(out / RESULTS_FILE, records)
    write_json(out / IMAGES_FILE, images)
    rate = len(images) / max(seconds, 1e-9)
    stderr.write(f"kiln predict: {len(images)} images in {seconds:.2f} s: {rate:.1f} images/s "
                 f"({len(records)} detections) -> {out}/{RESULTS_FILE}\n")
    return {"images": len(images), "detections": len(records), "skipped": skipped, "seconds": seconds,
            "images_per_s": rate, "results": str(out / RESULTS_FILE), "image_ids": str(out / IMAGES_FILE)}


def _video(item: Item, dst: Path, detector: Detector, emit, report) -> bool:
    """Every frame of a video through the detector, written annotated to `dst` (mp4v); False if unreadable."""
    import cv2
    import numpy as np
    from PIL import Image

    cap = cv2.VideoCapture(str(item.path))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            report(f"video '{item.path}' cannot be read (OpenCV {cv2.__version__} decodes no frame of it)")
            return False
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        h, w = frame.shape[:2]
        with atomic_path(dst, suffix=".tmp.mp4") as tmp:
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not writer.isOpened():
                raise KilnError(f"OpenCV {cv2.__version__} cannot write '{dst}' (mp4v): install an OpenCV build "
                                f"with video I/O")
            index, batch = 0, []
            try:
                while ok:
                    batch.append((item, Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)), index))
                    index += 1
                    ok, frame = cap.read()
                    if len(batch) >= detector.max_batch or not ok:
                        for picture in emit(batch):
                            writer.write(cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
                        batch = []
            finally:
                writer.release()
        return True
    finally:
        cap.release()


def add_command(sub) -> None:
    """`kiln predict` on the CLI's subparsers."""
    p = sub.add_parser("predict", help="run an engine folder on images, folders and videos: annotated pictures "
                                       "and COCO-format detections")
    p.add_argument("engine_dir", help="an engine folder the build stage wrote (results/engines/DEVICE/MODEL/PRECISION)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, video files, or folders of them")
    p.add_argument("--out", required=True, help="folder for the annotated pictures, detections.json and images.json")
    p.add_argument("--batch-size", type=int, default=None, help="images per engine call (default and cap: the "
                                                                "engine's largest batch)")
    p.add_argument("--min-score", type=float, default=MIN_SCORE, help="draw detections scoring at least this "
                                                                      f"(default {MIN_SCORE}; the JSON has all)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of ONNX Runtime (0: its default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args) -> int:
    try:
        summary = run(args.engine_dir, args.inputs, args.out, batch_size=args.batch_size, min_score=args.min_score,
                      threads=args.threads, progress=not args.no_progress)
    except KilnError as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 1
    if summary["skipped"]:
        n = len(summary["skipped"])
        print(f"kiln: predict: {n} input{'s' if n > 1 else ''} could not be read (listed above) and "
              f"{'were' if n > 1 else 'was'} skipped; the others are in {args.out}", file=sys.stderr)
        return 1
    return 0
