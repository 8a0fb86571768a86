"""A stand-in for kiln.runtime.Detector (tests only, until kiln/runtime.py lands), with the same API.

``Detector.load(engine_dir)`` reads engine.json and model.json there (the serve stage writes both) and
loads model.engine through kiln.backends; ``predict([HxWx3 uint8, ...])`` preprocesses as kiln.inputs
does, runs the engine and decodes with kiln.accuracy, returning per image ``boxes`` (N, 4) xyxy in the
image's pixels, ``scores``, ``class_ids`` and ``class_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln import accuracy, backends
from kiln.batches import Inputs
from kiln.preprocess import letterbox, resize
from kiln.specs import DeviceProfile, ModelSpec

TUPLES = ("input_size", "surgery", "trusted_packages", "trusted_folders", "precisions", "providers",
          "batch_sizes", "models", "profiles")


def _spec(cls, data: dict):
    return cls(**{k: tuple(v) if k in TUPLES and isinstance(v, list) else v for k, v in data.items()})


class Detector:
    def __init__(self, runner, spec: ModelSpec, class_names: list[str]):
        self.runner, self.spec, self.class_names = runner, spec, class_names

    @classmethod
    def load(cls, engine_dir) -> Detector:
        engine_dir = Path(engine_dir)
        rec = json.loads((engine_dir / "engine.json").read_text())
        meta = json.loads((engine_dir / "model.json").read_text())
        device = _spec(DeviceProfile, meta["device"])
        runner = backends.get(rec["backend"]).load_runner(engine_dir / "model.engine", device)
        return cls(runner, _spec(ModelSpec, meta["model"]), meta["class_names"])

    def predict(self, images) -> list[dict]:
        from PIL import Image

        out = []
        for image in images:
            rgb = Image.fromarray(np.asarray(image, dtype=np.uint8))
            if self.spec.preprocess == "letterbox":
                arr, r, pad = letterbox(rgb, self.spec.input_size)
            else:
                arr, r, pad = resize(rgb, self.spec.input_size), 1.0, (0.0, 0.0)
            inputs = Inputs(images=arr.transpose(2, 0, 1)[None], image_ids=np.array([0]),
                            orig_sizes=np.array([(rgb.width, rgb.height)]), ratios=np.array([r], dtype=np.float64),
                            pads=np.array([pad], dtype=np.float64))
            det = accuracy.detections(self.spec, self.runner.infer(inputs.feeds(self.spec, 0, 1)), inputs)[0]
            ids = np.asarray(det["labels"], dtype=np.int64)
            out.append({"boxes": det["boxes"], "scores": det["scores"], "class_ids": ids,
                        "class_names": [self.class_names[i] for i in ids]})
        return out

    def close(self) -> None:
        self.runner.close()
