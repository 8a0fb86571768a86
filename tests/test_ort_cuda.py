"""ONNX Runtime's CUDA provider as a device: refused with the reason where it cannot run, its CPU fallbacks
found in the optimized graph and flagged in the summary, and (on a GPU host with onnxruntime-gpu) run
with device-resident I/O and CUDA events."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from kiln import backends
from kiln.backends.ort_cuda import cpu_fallback
from kiln.config import load
from tests.conftest import tiny_config

GPU_DEVICE = {"backend": "onnxruntime", "providers": ["CUDAExecutionProvider"], "compute_capability": "9.0",
              "opset": 17, "precisions": ["fp32", "fp16", "int8"], "batch_sizes": [1, 8]}
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _cfg():
    raw = tiny_config()
    raw["devices"] = {"cpu": raw["devices"]["cpu"], "h200": GPU_DEVICE}
    return load(raw, check_paths=False)


@pytest.mark.skipif(HAS_CUDA, reason="this host has the CUDA provider: the refusal below is for hosts without it")
def test_a_cuda_device_is_not_run_here_with_the_reason():
    cfg = _cfg()
    d = cfg.devices["h200"]
    backend = backends.get(d.backend)
    reason = backend.check_host(d)
    assert reason == (f"ONNX Runtime {ort.__version__} here lacks CUDAExecutionProvider (has "
                      f"{', '.join(ort.get_available_providers())})")
    assert backend.check_build_host(d) == reason  # the optimized model is provider-specific: built there too
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"^cannot run 'm.engine' here: ONNX Runtime .* lacks CUDAExecutionProvider"):
        backend.load_runner("m.engine", d)


def test_a_cuda_device_is_placed_on_a_gpu_and_timed_there():
    cfg = _cfg()
    d = cfg.devices["h200"]
    backend = backends.get(d.backend)
    assert backend.needs_gpu(d, "build") and backend.needs_gpu(d, "validate")
    assert backend.baseline_torch_device(d) == "cuda"
    cpu = cfg.devices["cpu"]
    assert not backend.needs_gpu(cpu, "validate") and backend.baseline_torch_device(cpu) == "cpu"
    from kiln import workflow

    assert workflow.gpu_count(cfg, "h200", "validate") == 1 and workflow.gpu_count(cfg, "cpu", "validate") is None


def test_cpu_fallbacks_are_found_in_the_optimized_graph_and_flagged():
    ops = {"Conv": 30, "MemcpyToHost": 9, "MemcpyFromHost": 9, "TopK": 1}
    found = cpu_fallback(ops)
    assert found["memcpy_nodes"] == 18
    assert found["finding"].startswith("ONNX Runtime placed nodes on the CPU provider: it inserted 18 Memcpy nodes")
    assert cpu_fallback({"Conv": 30}) is None and cpu_fallback(None) is None
    cfg = _cfg()
    backend = backends.get("onnxruntime")
    assert backend.findings(cfg.devices["h200"], {"ops_out": ops}) == [found["finding"]]
    assert backend.findings(cfg.devices["cpu"], {"ops_out": ops}) == []  # the CPU provider's own graph: no fallback


def test_the_summary_flags_a_validation_finding(tmp_path):
    from kiln import summary
    from kiln.util import write_json

    cfg = load({**tiny_config(), "results": str(tmp_path / "results")}, check_paths=False)
    finding = cpu_fallback({"MemcpyToHost": 2})["finding"]
    rec = {"status": "built", "engine_sha256": "x", "engine_bytes": 1}
    v = {"status": "passed", "reason": None, "build": {"engine_bytes": 1}, "findings": [finding],
         "validated": {"engine_sha256": "x", "reference_sha256": None},
         "latency": [{"batch_size": 1, "median_ms": 1.0}]}
    base = tmp_path / "results"
    write_json(base / "engines/cpu/yolo_demo/fp32/engine.json", rec)
    write_json(base / "validation/cpu/yolo_demo/fp32/validation.json", v)
    row = summary._row(cfg, "cpu", "yolo_demo", "fp32", None, None)
    assert finding in (row["flags"] or ""), row


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu's CUDA provider and an NVIDIA GPU (not on this host)")
def test_cuda_runner_matches_the_cpu_session(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln.backends.ort_cuda import OrtCudaRunner

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    runner = OrtCudaRunner(path, _cfg().devices["h200"])
    try:
        got = runner.infer({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        marks = []
        runner.query({"x": x}, marks.append)()
        assert marks == ["h2d", "compute", "d2h"]
    finally:
        runner.close()


def test_a_gpu_build_that_falls_back_to_the_cpu_is_refused(tmp_path, monkeypatch):
    """Without the CUDA libraries loaded, ONNX Runtime builds the session on the CPU provider without
    an error: the build refuses it rather than saving a CPU-optimized model as the GPU engine."""
    from kiln.backends import onnxruntime as kiln_ort
    from kiln.backends import ort_cuda
    from kiln.errors import KilnError

    loaded = []
    monkeypatch.setattr(ort_cuda, "load_cuda_libraries", lambda: loaded.append(True) or "test")

    class FellBack:
        def __init__(self, path, sess_options=None, providers=None):
            self.asked = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    d = _cfg().devices["h200"]
    engine = tmp_path / "model.engine"
    with pytest.raises(KilnError, match=r"without CUDAExecutionProvider \(it fell back to CPUExecutionProvider\): "
                                        r"its CUDA or cuDNN libraries did not load"):
        kiln_ort.build(tmp_path / "m.onnx", engine, d, "fp32")
    assert loaded == [True] and not engine.exists()
