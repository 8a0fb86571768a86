"""Shared fixtures: a small valid config on disk, helpers to break it, and one tiny workflow run per session."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
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


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The repository's workflow in `workdir` on its config.yaml, two cores."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow on tiny_config() (committed demo checkpoints), run once for the session.

    Several test files read its results; none may change the folder. A test that damages, edits or
    reruns results works on copy_run(tiny_run, ...) instead.
    """
    work = tmp_path_factory.mktemp("tiny-run")
    (work / "models").mkdir()
    for name in ("demo_yolo.pt", "demo_rtdetr.pt"):
        if not (REPO / "models" / name).is_file():
            pytest.skip(f"committed checkpoint models/{name} is missing")
        shutil.copy(REPO / "models" / name, work / "models" / name)
    write_config(work / "config.yaml", tiny_config())
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def random_yolo_config() -> dict:
    """tiny_config's yolo_demo alone (random weights at its usual path): cpu fp32 and int8 at batch sizes 1
    and 2, rtx fp16, h100 fp16 (not run here)."""
    cfg = tiny_config()
    del cfg["models"]["rtdetr_demo"]
    cfg["devices"]["cpu"].update(precisions=["fp32", "int8"], batch_sizes=[1, 2])
    cfg["devices"]["rtx"]["precisions"] = ["fp16"]
    return cfg


@pytest.fixture(scope="session")
def random_yolo_run(tmp_path_factory) -> Path:
    """The whole workflow on random_yolo_config(), with random_checkpoints()' yolo weights, once for the session.

    Read-only like tiny_run: tests that run Snakemake on it again work on a copy (copy_run).
    """
    work = tmp_path_factory.mktemp("random-yolo-run")
    random_checkpoints(work / "models/demo_yolo.pt")
    write_config(work / "config.yaml", random_yolo_config())
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def copy_run(src: Path, dst: Path, config: dict | None = None) -> Path:
    """A private copy of a finished run: results/, models/ and Snakemake's metadata (.snakemake/, which
    holds each output's params, code and inputs), every file's mtime kept, so Snakemake sees the same
    state there. With `config`, that config is written as the copy's config.yaml: the next run makes
    only what it changes."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    if config is not None:
        write_config(dst / "config.yaml", config)
    return dst


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
