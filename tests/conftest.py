"""Shared fixtures: a small valid config on disk, and helpers to break it."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def tiny_config(checkpoint_yolo: str = "models/demo_yolo.pt", checkpoint_rtdetr: str = "models/demo_rtdetr.pt") -> dict:
    """A config like the demo, but small enough for tests (few images, short latency runs)."""
    return {
        "results": "results",
        "datasets": {"demo": {"generator": "shapes", "seed": 0, "image_size": 256, "calib": {"count": 8},
                              "val": {"count": 16}}},
        "models": {
            "yolo_demo": {
                "source": "torch", "factory": "kiln.demo.models:yolo_demo", "factory_args": {"num_classes": 3},
                "checkpoint": checkpoint_yolo, "layout": "yolo", "dataset": "demo", "input_size": [256, 256],
                "calibration": {"images": 8},
            },
            "rtdetr_demo": {
                "source": "torch", "factory": "kiln.demo.models:rtdetr_demo", "factory_args": {"num_classes": 3},
                "checkpoint": checkpoint_rtdetr, "layout": "rtdetr", "dataset": "demo", "input_size": [256, 256],
                "calibration": {"images": 8},
            },
        },
        "devices": {
            "cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32", "fp16", "int8"], "batch_sizes": [1]},
            # Real TensorRT-RTX builds, ahead of time on this CPU-only host.
            "rtx": {"backend": "tensorrt-rtx", "compute_capability": "8.9", "opset": 17,
                    "precisions": ["fp32", "fp16", "int8"], "batch_sizes": [1], "builder_optimization_level": 1},
            # Full TensorRT is not installable here: listed as not run on this host.
            "h100": {"backend": "tensorrt", "compute_capability": "9.0", "tensorrt": {"min": "11.0"},
                     "opset": 17, "precisions": ["fp16"], "batch_sizes": [1]},
        },
        "validation": {"batch_size": 8, "latency": {"warmup_ms": 10, "min_iterations": 5, "min_seconds": 0.05}},
    }


@pytest.fixture(autouse=True, scope="session")
def kiln_cache(tmp_path_factory) -> Path:
    """Kiln's on-disk caches (kiln.cache) in a folder of this test session, never the user's ~/.cache/kiln.

    Set in the environment, so the subprocesses tests start (snakemake, kiln check) use it too.
    """
    folder = tmp_path_factory.mktemp("kiln-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def config_dict() -> dict:
    return copy.deepcopy(tiny_config())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory holding the committed demo checkpoints under models/."""
    (tmp_path / "models").mkdir()
    for name in ("demo_yolo.pt", "demo_rtdetr.pt"):
        src = REPO / "models" / name
        if not src.is_file():
            pytest.skip(f"committed checkpoint {src} is missing")
        shutil.copy(src, tmp_path / "models" / name)
    return tmp_path


def random_checkpoints(yolo: Path | None = None, rtdetr: Path | None = None) -> None:
    """State dicts of the demo factories with random weights (seed 0; the yolo one first), for tests that
    need a checkpoint but not a trained one."""
    import torch

    from kiln.demo.models import rtdetr_demo, yolo_demo

    torch.manual_seed(0)
    for path, factory in ((yolo, yolo_demo), (rtdetr, rtdetr_demo)):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(factory(num_classes=3).state_dict(), path)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def chdir(tmp_path: Path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)
