"""The PyTorch eager baseline, and the speedup it gives validation and the summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln import baseline, latency, paths, summary
from kiln.config import load
from kiln.util import read_json, write_json
from tests.conftest import random_checkpoints


@pytest.fixture
def cfg(config_dict, tmp_path):
    """Random-weight checkpoints of the demo factories; a CPU device and a CUDA-provider device."""
    random_checkpoints(tmp_path / "y.pt", tmp_path / "r.pt")
    config_dict["models"]["yolo_demo"]["checkpoint"] = str(tmp_path / "y.pt")
    config_dict["models"]["rtdetr_demo"]["checkpoint"] = str(tmp_path / "r.pt")
    config_dict["results"] = str(tmp_path / "results")
    config_dict["devices"] = {
        "cpu": {"backend": "onnxruntime", "precisions": ["fp32"], "batch_sizes": [2]},
        "gpu": {"backend": "onnxruntime", "providers": ["CUDAExecutionProvider"], "precisions": ["fp16"],
                "models": ["yolo_demo"]},
    }
    return load(config_dict, check_paths=False)


@pytest.fixture
def inputs_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "val.npz"
    np.savez(path, images=rng.integers(0, 255, size=(3, 3, 256, 256), dtype=np.uint8),
             image_ids=np.arange(3), orig_sizes=np.full((3, 2), 256), ratios=np.ones(3), pads=np.zeros((3, 2)))
    return path


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("model", ["yolo_demo", "rtdetr_demo"])
def test_baseline_times_eager_pytorch_on_cpu(cfg, inputs_npz, tmp_path, model):
    out = tmp_path / "b.json"
    rec = baseline.run_baseline(cfg, "cpu", model, inputs_npz, out, threads=1)
    assert rec["status"] == "measured" and rec["reason"] is None, rec.get("reason")
    assert rec["torch_device"] == "cpu" and rec["threads"] == 1 and rec["torch"] == torch.__version__
    # Batch 1 is always timed (the speedup is taken there), then the device's batch sizes.
    assert [lat["batch_size"] for lat in rec["latency"]] == [1, 2]
    for lat in rec["latency"]:
        assert lat["iterations"] >= 5 and 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
        assert lat["timer"] == "host perf_counter"
    assert read_json(out)["latency"] == rec["latency"]
    assert latency.median_at(rec) == rec["latency"][0]["median_ms"]


def test_baseline_needing_cuda_is_recorded_not_fatal(cfg, inputs_npz, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the GPU baseline would run")
    rec = baseline.run_baseline(cfg, "gpu", "yolo_demo", inputs_npz, tmp_path / "g.json")
    assert rec["torch_device"] == "cuda" and rec["status"] == "failed" and rec["latency"] == []
    assert "has no CUDA device" in rec["reason"]
    assert read_json(tmp_path / "g.json")["status"] == "failed"


def test_baseline_params_and_targets(cfg):
    p = baseline.params(cfg, "cpu", "yolo_demo")
    assert p["torch_device"] == "cpu" and p["batch_sizes"] == [1, 2] and p["model"]["factory"]
    assert baseline.params(cfg, "gpu", "yolo_demo")["torch_device"] == "cuda"
    # Like validation: only devices this host can build and run.
    got = baseline.targets(cfg, {"cpu": None, "gpu": "lacks CUDAExecutionProvider"}, {"cpu": None, "gpu": None})
    assert got == [paths.fmt(paths.BASELINE, results=cfg.results, device="cpu", model=m)
                   for m in ("rtdetr_demo", "yolo_demo")]


def test_speedup_reaches_validation_and_the_summary(cfg, tmp_path):
    from kiln.validate import _speedup

    engine = [{"batch_size": 1, "median_ms": 2.5}, {"batch_size": 2, "median_ms": 4.0}]
    b = tmp_path / "b.json"
    write_json(b, {"status": "measured", "torch": "2.x", "torch_device": "cpu",
                   "latency": [{"batch_size": 1, "median_ms": 10.0}]})
    sp = _speedup(b, engine)
    assert sp["speedup_vs_pytorch"] == pytest.approx(4.0) and sp["baseline"]["median_ms_batch1"] == 10.0
    write_json(b, {"status": "failed", "reason": "no CUDA", "latency": []})
    assert _speedup(b, engine)["speedup_vs_pytorch"] is None
    assert _speedup(None, engine) == {"baseline": None, "speedup_vs_pytorch": None}

    v = {"status": "passed", "reason": None, "build": {"engine_bytes": 1},
         "parity": {"outputs": {"output0": {"cosine": 1.0, "max_abs": 0.0}}},
         "accuracy": {"map50_95": 0.5, "map50": 0.7, "map_drop": 0.0, "map50_drop": 0.0},
         "latency": [{"batch_size": 1, "mean_ms": 2.6, "median_ms": 2.5, "p99_ms": 3.0, "cv_percent": 1.0,
                      "throughput_ips": 400.0, "phases": {"compute": {"median_ms": 2.0}}}],
         "pipeline": [{"batch_size": 1, "median_ms": 3.5}],
         "baseline": {"median_ms_batch1": 10.0}, "speedup_vs_pytorch": 4.0}
    write_json(paths.fmt(paths.VALIDATION, results=cfg.results, device="cpu", model="yolo_demo", precision="fp32"), v)
    row = summary._row(cfg, "cpu", "yolo_demo", "fp32", None, None)
    assert row["speedup_vs_pytorch"] == 4.0 and row["pytorch_latency_median_ms"] == 10.0
    assert row["gpu_compute_median_ms"] == 2.0 and row["pipeline_median_ms"] == 3.5
    assert set(summary.COLUMNS) >= {"speedup_vs_pytorch", "pipeline_median_ms", "gpu_compute_median_ms"}
