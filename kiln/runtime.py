"""Kiln's runtime API: load an engine folder that the workflow built and run detection with it.

    from kiln.runtime import Detector

    detector = Detector.load("results/engines/cpu/yolo_demo/int8")
    for det in detector.predict(["a.jpg", rgb_array]):   # paths, or HxWx3 uint8 RGB arrays
        print(det.boxes, det.scores, det.class_ids, det.class_names)

An engine folder is what the `build` stage writes: ``engine.json`` and the engine (``model.engine``).
The record's ``runtime`` section (kiln.build) holds what running it needs besides the engine: the
model's preprocessing, layout, I/O names, decode thresholds and class names, and the device profile
that its backend checks a host against. :meth:`Detector.load` checks the engine file against its
record (kiln.integrity) and the host against the device (the backend's ``check_host``), then loads
the engine through its backend's runner (``kiln.backends.get(record["backend"]).load_runner``).

:meth:`Detector.predict` preprocesses with the code of the `inputs` stage (kiln.preprocess, through
kiln.batches.from_images), runs the engine in batches of up to :attr:`Detector.max_batch` images,
and decodes with validation's code (kiln.accuracy.detections: decode and NMS of kiln.postprocess,
boxes mapped back to original pixels). So the detections are the validated ones: the mAP of
``predict`` over the validation images is validation.json's (tests/test_runtime.py checks it to 1e-6).
Detections are every one above the model's ``decode.conf_threshold`` (0.001 by default, the
threshold mAP is measured at); filter by score for display.

Threads: one Detector may be shared by several threads. Each thread that calls ``predict`` gets its
own runner, loaded on its first call: its own ONNX Runtime session, or its own TensorRT engine and
execution context with its own CUDA stream, so calls never share a context or a stream and run
concurrently. :meth:`close` releases every thread's runner. For N camera streams, call ``predict``
from N threads (or give each its own Detector); each runner holds its own copy of the engine's
memory.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import accuracy, backends, batches, integrity
from kiln.backends.base import Runner
from kiln.errors import KilnError
from kiln.specs import DeviceProfile, ModelSpec

__all__ = ["DEFAULT_BATCH", "Detections", "Detector"]

RECORD = "engine.json"
# Batch of an engine whose runner names no largest batch (ONNX Runtime with a dynamic batch axis):
# validation's default batch_size, so predict runs the batches validation ran.
DEFAULT_BATCH = 8


@dataclass
class Detections:
    """One image's detections, best first."""

    boxes: np.ndarray  # (N, 4) float32, xyxy in the original image's pixels
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int64, 0-based: index into the engine's classes
    class_names: list[str]  # (N,)
    image_size: tuple[int, int]  # the original image's (width, height)

    def __len__(self) -> int:
        return len(self.scores)

    def as_labels(self) -> dict[str, np.ndarray]:
        """kiln.postprocess's form (boxes, scores, labels), as kiln.draw and kiln.metrics take it."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.class_ids}


def read_record(engine_dir: str | Path) -> tuple[Path, dict]:
    """The engine folder's engine.json, read; a missing folder, record or runtime section is one line."""
    folder = Path(engine_dir)
    hint = "pass a folder the build stage wrote (results/engines/DEVICE/MODEL/PRECISION, with engine.json)"
    if not folder.is_dir():
        raise KilnError(f"engine folder '{folder}' does not exist: {hint}")
    path = folder / RECORD
    if not path.is_file():
        raise KilnError(f"'{folder}' holds no {RECORD}, so it is not an engine folder: {hint}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KilnError(f"{path} cannot be read ({err}): run Snakemake again with --forcerun {path}") from None
    if record.get("status") != "built":
        raise KilnError(f"{path} says its build failed ({record.get('reason')}): there is no engine to run; "
                        f"fix the build (the summary's row says why) or use another precision")
    if not isinstance(record.get("runtime"), dict):
        raise KilnError(f"{path} has no 'runtime' section (an older Kiln built it): rebuild it with "
                        f"snakemake --forcerun {path}")
    return path, record


def model_spec(runtime: dict) -> ModelSpec:
    """The ModelSpec that preprocessing and decoding read, from the record's ``runtime.model``.

    Only the fields they use come from the record; the others (where the checkpoint came from, how it
    was exported) are the engine's past, not needed to run it.
    """
    m = runtime["model"]
    return ModelSpec(
        name=m["name"], source="engine", factory=None, factory_args={}, checkpoint="", layout=m["layout"],
        dataset="", input_size=tuple(m["input_size"]), preprocess=m["preprocess"],
        dynamic_batch=bool(m["dynamic_batch"]), dynamic_hw=bool(m["dynamic_hw"]), surgery=(), simplify=False,
        decode=dict(m["decode"]), calibration={}, nms=m["nms"], resize_backend=m.get("resize_backend", "pil"),
    )


def device_profile(record: dict) -> DeviceProfile:
    """The device profile its backend checks a host against and loads engines for, from ``runtime.device``."""
    fields = dict(record["runtime"]["device"])
    for key in ("providers", "profiles"):
        fields[key] = tuple(fields.get(key) or ())
    return DeviceProfile(**fields, precisions=(record["precision"],), threads=0, batch_sizes=(1,),
                         models=(record["model"],))


def read_rgb(path: str | Path) -> Any:
    """The image file at `path` as a PIL RGB image; one KilnError line when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as raw:
            rgb = raw.convert("RGB")
            rgb.load()
    except (OSError, ValueError) as err:
        raise KilnError(f"image '{path}' cannot be read ({err}): replace or remove it") from None
    except ImportError:  # Ultralytics, once imported, patches PIL's open to try a HEIF plugin on unknown files
        raise KilnError(f"image '{path}' cannot be read (cannot identify image file {str(path)!r}): replace or "
                        f"remove it") from None
    return rgb


def _image(item) -> Any:
    """A PIL RGB image from a path, an HxWx3 uint8 RGB array or a PIL image; one line when it is none."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        return read_rgb(item)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise KilnError(f"an image array must be HxWx3 uint8 RGB, not {item.dtype} {item.shape}: convert it "
                            f"(e.g. cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for an OpenCV frame)")
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    raise KilnError(f"cannot predict on a {type(item).__name__}: pass image paths, HxWx3 uint8 RGB arrays "
                    f"or PIL images")


class Detector:
    """An engine folder loaded for detection: see the module docstring. Make one with :meth:`load`."""

    def __init__(self, engine_dir: Path, record: dict, runner: Runner, threads: int, batch_size: int | None):
        self.engine_dir = engine_dir
        self.record = record
        self.spec = model_spec(record["runtime"])
        self.device = device_profile(record)
        self.backend = backends.get(record["backend"])
        self.engine_path = engine_dir / Path(record["engine"]).name
        # Classes in label order, {"id": COCO category id, "name"} (empty when the split had none).
        self.categories: list[dict] = list(record["runtime"].get("classes") or [])
        self._threads = threads
        self._lock = threading.Lock()
        self._local = threading.local()
        self._local.runner = runner
        self._runners = [runner]
        engine_max = runner.max_batch() if self.spec.dynamic_batch else 1
        most = engine_max or DEFAULT_BATCH
        self.max_batch = min(batch_size, most) if batch_size else most

    @classmethod
    def load(cls, engine_dir: str | Path, threads: int = 0, batch_size: int | None = None) -> Detector:
        """Check and load the engine of a folder the build stage wrote.

        Args:
            engine_dir: the engine folder (``results/engines/DEVICE/MODEL/PRECISION``): engine.json and
                the engine file it names.
            threads: CPU threads per runner where its backend takes them (ONNX Runtime; 0: its default).
            batch_size: the most images one engine call takes (default and cap: the engine's largest
                batch, or DEFAULT_BATCH where the engine names none).

        Returns:
            A Detector whose runner for this thread is loaded.

        Raises:
            KilnError: one line, when the folder is no engine folder, the engine is not the one its
                record describes, or this host cannot run it (the backend's reason).
        """
        folder = Path(engine_dir)
        path, record = read_record(folder)
        engine = folder / Path(record["engine"]).name
        integrity.check(integrity.engine_problem(record, path, engine, full=True))
        backend = backends.get(record["backend"])
        device = device_profile(record)
        reason = backend.check_host(device)
        if reason:
            raise KilnError(f"engine '{folder}' is for device '{device.name}' ({backend.label}) and cannot run on "
                            f"this host: {reason}")
        return cls(folder, record, _load_runner(backend, engine, device, threads), threads, batch_size)

    # ------------------------------------------------------------------ classes

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (``class N`` where the validation split named none)."""
        return [str(c["name"]) for c in self.categories]

    def class_name(self, label: int) -> str:
        names = self.class_names
        return names[label] if 0 <= label < len(names) else f"class {label}"

    # ------------------------------------------------------------------ running

    def runner(self) -> Runner:
        """This thread's runner (its own session or execution context), loaded on its first use."""
        runner = getattr(self._local, "runner", None)
        if runner is None:
            runner = _load_runner(self.backend, self.engine_path, self.device, self._threads)
            with self._lock:
                if self._runners is None:  # closed meanwhile
                    runner.close()
                    raise KilnError(f"the Detector of '{self.engine_dir}' is closed: load it again")
                self._runners.append(runner)
            self._local.runner = runner
        return runner

    def predict(self, images, batch_size: int | None = None) -> list[Detections]:
        """Detections of each image, in order: paths, HxWx3 uint8 RGB arrays or PIL images (or one of them).

        Images go through the engine in batches of up to ``batch_size`` (default and cap: max_batch).
        """
        if self._runners is None:
            raise KilnError(f"the Detector of '{self.engine_dir}' is closed: load it again")
        if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        images = list(images)
        size = min(batch_size, self.max_batch) if batch_size else self.max_batch
        runner = self.runner()
        out: list[Detections] = []
        for start in range(0, len(images), size):
            chunk = [_image(x) for x in images[start:start + size]]
            feeds, meta = batches.from_images(self.spec, chunk)
            outputs = runner.infer(feeds)
            for img, d in zip(chunk, accuracy.detections(self.spec, outputs, meta)):
                ids = np.asarray(d["labels"], dtype=np.int64)
                out.append(Detections(boxes=np.asarray(d["boxes"], dtype=np.float32),
                                      scores=np.asarray(d["scores"], dtype=np.float32), class_ids=ids,
                                      class_names=[self.class_name(int(i)) for i in ids], image_size=img.size))
        return out

    def close(self) -> None:
        """Release every thread's runner (sessions, contexts, device memory)."""
        with self._lock:
            runners, self._runners = self._runners or [], None
        for runner in runners:
            runner.close()
        self._local = threading.local()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_runner(backend, engine: Path, device: DeviceProfile, threads: int) -> Runner:
    try:
        return backend.load_runner(engine, device, threads=threads)
    except KilnError:
        raise
    except Exception as err:  # the runtime's own error types: one line, not its traceback
        text = str(err).replace("\n", " ")
        raise KilnError(f"{backend.label} could not load '{engine}' ({type(err).__name__}: {text}): rebuild it "
                        f"with snakemake --forcerun {engine.parent / RECORD}") from None
