"""Train models/ultralytics_demo.pt: a YOLOv8n trained by Ultralytics' own trainer on the demo shapes data.

Not part of the workflow. It makes the checkpoint (and models/ultralytics_demo.json, the figures of
Ultralytics' own validator on it) that tests/test_ultralytics_fidelity.py compares Kiln's mAP with.
Run it from the repository root; about 15 minutes on 2 CPU cores:

    python scripts/train_ultralytics_demo.py [--epochs 30] [--out models/ultralytics_demo.pt]

The data: kiln.demo.shapes' "train" split (seed 0) for training, and the first VAL_COUNT images of the
demo's "val" split (seed 0, 256 px: what the demo config's dataset stage generates) for validation,
written in YOLO format (images/, labels/ with normalised cx cy w h, data.yaml).

torchvision's compiled NMS does not load on the CPU torch build of this project's environment
("operator torchvision::nms does not exist"), so Ultralytics' NMS call is patched, before Ultralytics
trains, to Ultralytics' own pure-torch NMS (``ultralytics.utils.nms.TorchNMS.nms``, written to match
torchvision's exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEED = 0
IMGSZ = 256
TRAIN_COUNT = 256
VAL_COUNT = 100
# Ultralytics' validator settings (ultralytics/cfg/default.yaml; val's conf default in
# ultralytics/models/yolo/detect/val.py): Kiln's defaults for source ultralytics are the same.
VAL_SETTINGS = {"conf": 0.001, "iou": 0.7, "max_det": 300}


def write_yolo_split(root: Path, split: str, count: int) -> Path:
    """Generate one demo split and write it as a YOLO dataset folder (images/, labels/)."""
    from kiln.demo.shapes import generate_split

    coco_dir = root / f"{split}_coco"
    ann = json.loads(generate_split(coco_dir, split, count, seed=SEED, image_size=IMGSZ).read_text())
    images, labels = root / split / "images", root / split / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    by_image: dict[int, list[dict]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in ann["images"]:
        shutil.copy(coco_dir / "images" / im["file_name"], images / im["file_name"])
        w, h = im["width"], im["height"]
        lines = [f"{a['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for a in by_image.get(im["id"], []) for x, y, bw, bh in [a["bbox"]]]
        (labels / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    return images


def pure_torch_nms() -> None:
    """Give Ultralytics a pure-torch NMS (see the module docstring).

    Its validator imports torchvision on creation, and ``ultralytics.utils.nms.non_max_suppression``
    calls ``torchvision.ops.nms`` once torchvision is imported; both fail here. A stand-in torchvision
    module whose ``ops.nms`` is Ultralytics' own ``TorchNMS.nms`` takes its place for this process.
    """
    import types

    from ultralytics.utils.nms import TorchNMS

    stand_in = types.ModuleType("torchvision")
    stand_in.ops = types.SimpleNamespace(nms=TorchNMS.nms)
    stand_in.__version__ = "0.0 (stand-in: pure-torch NMS)"
    sys.modules["torchvision"] = stand_in


def validate(weights: Path, data: Path, device: str, **settings) -> dict:
    from ultralytics import YOLO

    m = YOLO(str(weights)).val(data=str(data), imgsz=IMGSZ, batch=16, device=device, plots=False, verbose=False,
                               workers=0, **VAL_SETTINGS, **settings)
    return {"map50_95": round(float(m.box.map), 6), "map50": round(float(m.box.map50), 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default="models/ultralytics_demo.pt")
    ap.add_argument("--device", default="cpu", help="cpu, or a CUDA device index such as 0")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    import torch
    import ultralytics
    from ultralytics import YOLO

    torch.set_num_threads(2)
    pure_torch_nms()
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    with tempfile.TemporaryDirectory(prefix="kiln-ul-demo-") as tmp:
        root = Path(tmp)
        write_yolo_split(root, "train", TRAIN_COUNT)
        write_yolo_split(root, "val", VAL_COUNT)
        data = root / "data.yaml"
        data.write_text(json.dumps({"path": str(root), "train": "train/images", "val": "val/images",
                                    "names": {0: "circle", 1: "square", 2: "triangle"}}))
        model = YOLO("yolov8n.yaml")  # Ultralytics' own YAML, random init (nothing downloaded)
        model.train(data=str(data), epochs=args.epochs, imgsz=IMGSZ, batch=16, device=args.device, workers=0,
                    seed=SEED, deterministic=True, plots=False, val=False, amp=False, project=str(root / "runs"),
                    name="train", exist_ok=True, verbose=False)
        best = root / "runs" / "train" / "weights" / "last.pt"
        figures = {
            "ultralytics": ultralytics.__version__,
            "torch": torch.__version__,
            "device": args.device,
            "trained": {"model": "yolov8n.yaml", "nc": 3, "epochs": args.epochs, "imgsz": IMGSZ, "batch": 16,
                        "seed": SEED, "train": f"kiln.demo.shapes split 'train' seed {SEED}, {TRAIN_COUNT} images"},
            "val_images": f"kiln.demo.shapes split 'val' seed {SEED}, image_size {IMGSZ}: the first {VAL_COUNT}",
            "val_count": VAL_COUNT,
            "settings": {**VAL_SETTINGS, "imgsz": IMGSZ},
            # model.val()'s default: rectangular batches letterboxed to a stride multiple with pad 0.5 (288 px here).
            "validator_rect": validate(best, data, args.device),
            # Square letterbox at imgsz, as Kiln's inputs stage does: the same settings as Kiln's.
            "validator_square": validate(best, data, args.device, rect=False),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, out)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
