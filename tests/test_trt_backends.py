"""The TensorRT and TensorRT-RTX backends.

TensorRT-RTX compiles engines ahead of time without a GPU, so its builds run here for real: a
small conv net exported from PyTorch and its fp16 / int8 variants (kiln.precision). Running an
engine needs a CUDA driver, and full TensorRT cannot be installed on a CPU-only host; those tests
skip and say so. What needs neither (config-time refusals, the device guard, profiles, the
TensorRT < 11 build decisions, calibration feeds) is tested as plain Python.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import pkgutil
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kiln import paths
from kiln.backends import tensorrt, tensorrt_rtx
from kiln.backends import trt as trt_package
from kiln.backends.trt import builder, importer
from kiln.backends.trt import host as trt_host
from kiln.backends.trt.host import HostInfo, detect_host, guard, timing_cache_key
from kiln.backends.trt.profile import profiles_for
from kiln.config import load
from kiln.errors import KilnError
from kiln.util import atomic_path
from tests.conftest import tiny_config

NO_TRT = "TensorRT is not installable on this CPU-only host"
NO_RTX = "TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)"
needs_rtx = pytest.mark.skipif(not tensorrt_rtx.is_available(), reason=NO_RTX)

SIZE = 32
RTX_DEVICE = {
    "backend": "tensorrt-rtx",
    "compute_capability": "8.9",
    "precisions": ["fp32", "fp16", "int8"],
    # Level 0 keeps builds short; the AOT build of these nets takes a fraction of a second anyway.
    "builder_optimization_level": 0,
    "batch_sizes": [1, 4],
}
TRT_DEVICE = {"backend": "tensorrt", "compute_capability": "8.9", "tensorrt": {"min": "10.13"},
              "precisions": ["fp32", "fp16", "int8"]}


def load_device(device: dict, name: str = "dev"):
    """A KilnConfig holding the tiny test models and this one device (checkpoints need not exist)."""
    raw = tiny_config()
    raw["devices"] = {name: {"models": ["yolo_demo"], **copy.deepcopy(device)}}
    return load(raw, check_paths=False)


def device_of(device: dict, name: str = "dev"):
    return load_device(device, name).devices[name]


# --------------------------------------------------------------------------------------------------
# Models made here


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, Path]:
    """A conv net with a sigmoid output (opset 17, dynamic batch) and its fp16 and int8 variants."""
    import torch
    from torch import nn

    from kiln.precision import PrecisionOptions, make_variant

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return torch.sigmoid(self.c2(torch.relu(self.c1(x))))

    root = tmp_path_factory.mktemp("trt_models")
    torch.manual_seed(0)
    src = root / "fp32.onnx"
    torch.onnx.export(
        Net().eval(), torch.rand(1, 3, SIZE, SIZE), str(src), dynamo=False, opset_version=17,
        input_names=["images"], output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
    )
    calib = {"images": np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)}
    out = {"fp32": src}
    for p in ("fp16", "int8"):
        out[p] = root / f"{p}.onnx"
        make_variant(src, out[p], PrecisionOptions(p), calib=calib if p == "int8" else None, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def bad_onnx(tmp_path_factory) -> Path:
    """A graph whose second node is an op of an unknown domain: no parser or plugin knows it."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    nodes = [helper.make_node("Relu", ["images"], ["r"], name="relu0"),
             helper.make_node("FancyOp", ["r"], ["output0"], name="fancy_node", domain="com.example")]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path_factory.mktemp("trt_bad") / "bad.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# TensorRT-RTX builds on this CPU


@needs_rtx
@pytest.mark.parametrize("precision, dtype", [("fp32", "FLOAT"), ("fp16", "HALF"), ("int8", "INT8")])
def test_rtx_builds_engine_without_gpu(onnx_models, tmp_path, monkeypatch, precision, dtype):
    cfg = load_device(RTX_DEVICE)
    device = cfg.devices["dev"]
    plans: list[bytes] = []
    real = builder.serialize_network

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        plans.append(bytes(memoryview(plan)))
        return plan

    monkeypatch.setattr(builder, "serialize_network", spy)
    engine = tmp_path / "engines" / "engine.engine"
    with atomic_path(engine) as tmp:
        meta = tensorrt_rtx.build(onnx_models[precision], tmp, device, precision,
                                  validation_batch_size=cfg.validation["batch_size"])

    data = engine.read_bytes()
    assert data, "empty engine"
    # The file is the builder's plan, byte for byte: nothing prepended, nothing appended.
    assert len(plans) == 1 and data == plans[0]
    assert sorted(p.name for p in engine.parent.iterdir()) == ["engine.engine", "layers.json"]

    layers = json.loads((engine.parent / "layers.json").read_text())
    assert layers["source"] == "network"
    assert layers["num_layers"] == len(layers["layers"]) > 0
    assert all(layer["name"] and layer["type"] and layer["outputs"] for layer in layers["layers"])
    # Strongly typed: the variant's types reach the network (Cast to half, Quantize to int8).
    assert dtype in {o["dtype"] for layer in layers["layers"] for o in layer["outputs"]}

    assert meta["versions"]["tensorrt_rtx"] == tensorrt_rtx.version()
    assert meta["versions"]["polygraphy"]
    assert meta["builder"].startswith("TensorRT-RTX ")
    assert meta["strongly_typed"] is True and meta["source_precision"] == precision
    assert meta["compute_capabilities"] == ["8.9"]
    assert meta["compute_capability_targets"] == ["SM89"]  # read back from the builder config
    # Batch 1 .. max(batch_sizes + validation batch 8), optimized for the largest timed batch.
    assert meta["profiles"] == [{"images": {"min": [1, 3, SIZE, SIZE], "opt": [4, 3, SIZE, SIZE],
                                            "max": [8, 3, SIZE, SIZE]}}]
    assert meta["options"]["builder_optimization_level"] == 0
    assert meta["options"]["hardware_compatibility"] == "none"
    assert "TF32" in meta["builder_flags"]  # tf32 defaults to true
    assert meta["plan_bytes"] == len(data)
    assert meta["layers_source"] == "network" and meta["timing_cache"] is None
    assert meta["build_seconds"] >= 0
    assert "host" not in meta  # build_engine's record owns that key
    json.dumps(meta)  # the metadata goes into engine.json as it is


@needs_rtx
def test_rtx_tf32_off_and_workspace(onnx_models, tmp_path):
    device = device_of({**RTX_DEVICE, "tf32": False, "workspace_mb": 64})
    with atomic_path(tmp_path / "engine.engine") as tmp:
        meta = tensorrt_rtx.build(onnx_models["fp32"], tmp, device, "fp32")
    assert "TF32" not in meta["builder_flags"]
    assert meta["options"]["workspace_mb"] == 64


@needs_rtx
def test_rtx_parse_failure_names_node_and_leaves_no_engine(bad_onnx, tmp_path):
    device = device_of(RTX_DEVICE)
    engine = tmp_path / "engines" / "engine.engine"
    with pytest.raises(KilnError) as err, atomic_path(engine) as tmp:
        tensorrt_rtx.build(bad_onnx, tmp, device, "fp32")
    text = str(err.value)
    assert "fancy_node" in text and "com.example:FancyOp" in text and "node 1" in text
    assert not engine.exists()
    assert list(engine.parent.iterdir()) == []  # no temporary plan, no layers.json


@needs_rtx
def test_rtx_parse_failure_is_a_recorded_build_failure(bad_onnx, tmp_path, monkeypatch):
    from kiln.build import build_engine

    raw = tiny_config()
    raw["results"] = str(tmp_path / "results")
    raw["devices"] = {"rtx": {**RTX_DEVICE, "models": ["yolo_demo"]}}
    cfg = load(raw, check_paths=False)
    # build_engine asks check_host before building; TensorRT-RTX cannot *run* on this GPU-less host
    # but builds fine, so let the run check pass to exercise the failure path of the build itself.
    monkeypatch.setattr(tensorrt_rtx, "check_host", lambda device, host=None: None)
    record = tmp_path / "engine.json"
    info = build_engine(cfg, "rtx", "yolo_demo", "fp32", bad_onnx, record)
    assert info["status"] == "failed"
    assert "fancy_node" in info["reason"] and "FancyOp" in info["reason"]
    assert json.loads(record.read_text())["reason"] == info["reason"]
    engine = Path(paths.fmt(paths.ENGINE_FILE, results=cfg.results, device="rtx", model="yolo_demo",
                            precision="fp32"))
    assert not engine.exists()
    assert list(engine.parent.iterdir()) == []


@needs_rtx
def test_rtx_cannot_run_here_without_driver():
    if detect_host().driver:
        pytest.skip("this host has a CUDA driver")
    device = device_of(RTX_DEVICE)
    assert tensorrt_rtx.check_host(device) == "TensorRT-RTX engines need a CUDA driver to run; this host has none"
    assert tensorrt_rtx.check_build_host(device) is None
    with pytest.raises(KilnError, match="CUDA driver"):
        tensorrt_rtx.load_runner(Path("engine.engine"), device)


@needs_rtx
def test_polygraphy_flavors_do_not_mix_in_one_process(monkeypatch):
    import types

    from polygraphy import config as pg_config

    ns = importer.polygraphy_trt("tensorrt-rtx")
    ns.pg.util.get_trt_logger()  # makes Polygraphy import tensorrt_rtx for real
    assert pg_config.USE_TENSORRT_RTX is True
    fake = types.ModuleType("tensorrt")
    fake.Builder, fake.__version__ = object, "10.13.0.35"
    real = importer.import_trt
    monkeypatch.setattr(importer, "import_trt", lambda flavor: fake if flavor == "tensorrt" else real(flavor))
    with pytest.raises(KilnError, match="already uses tensorrt_rtx.*process of their own"):
        importer.polygraphy_trt("tensorrt")
    # Refused before changing anything: this process still builds TensorRT-RTX engines.
    assert pg_config.USE_TENSORRT_RTX is True and os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] == "1"


@needs_rtx
def test_rtx_target_list_matches_installed_module():
    assert set(tensorrt_rtx.KNOWN_COMPUTE_CAPABILITIES) <= set(tensorrt_rtx.target_compute_capabilities())
    assert "9.0" not in tensorrt_rtx.target_compute_capabilities()


def test_rtx_run_needs_gpu_of_the_target():
    device = device_of(RTX_DEVICE, name="rtx4090")
    assert "CUDA driver" in tensorrt_rtx.check_host(device, HostInfo())
    hopper = HostInfo(compute_capability="9.0", gpu="NVIDIA H100 80GB HBM3", driver=True, tensorrt_rtx="1.7.1.116")
    assert tensorrt_rtx.check_host(device, hopper).startswith(
        "TensorRT-RTX does not run on compute capability 9.0 (this host's NVIDIA H100 80GB HBM3)")
    ada = HostInfo(compute_capability="8.9", driver=True, tensorrt_rtx="1.7.1.116")
    assert tensorrt_rtx.check_host(device, ada) is None
    blackwell = HostInfo(compute_capability="12.0", driver=True, tensorrt_rtx="1.7.1.116")
    assert tensorrt_rtx.check_host(device, blackwell) == (
        "engine for device 'rtx4090' needs compute capability 8.9; this host has 12.0: "
        "run this job on that device (README: Building on devices)")


# --------------------------------------------------------------------------------------------------
# Config-time refusals


@pytest.mark.parametrize("device, message", [
    ({**TRT_DEVICE, "compute_capability": "8.6", "precisions": ["fp8"]}, r"'fp8' needs compute capability 8\.9"),
    ({**TRT_DEVICE, "tensorrt": {"min": "8.5"}, "precisions": ["bf16"]}, r"'bf16' needs TensorRT 9"),
    ({**TRT_DEVICE, "tensorrt": {"min": "11.0"}, "precisions": ["best"]}, r"'best' .*TensorRT 11"),
    ({**TRT_DEVICE, "tensorrt": {"min": "11.0"}, "precisions": ["fp32"], "int8_mode": "calibrator"},
     r"int8_mode: calibrator.*TensorRT 11"),
    ({**TRT_DEVICE, "tensorrt": {"min": "8.5"}, "opset": 18, "precisions": ["fp32"]},
     r"'opset' 18 is above what TensorRT 8\.5's ONNX parser supports \(17\)"),
    ({**TRT_DEVICE, "tensorrt": {"min": "10.13"}, "opset": 20, "precisions": ["fp32"]}, None),
    ({**TRT_DEVICE, "tensorrt": {"min": "8.6"}, "precisions": ["int8"]}, r"opset 19.*int8_mode: calibrator"),
    ({**TRT_DEVICE, "precisions": ["fp16"], "dla_core": 0}, r"'dla_core' is set but the device is not a Jetson"),
    ({**TRT_DEVICE, "tensorrt": {"min": "10.13", "max": "11.0"}}, r"across TensorRT 11"),
    ({k: v for k, v in TRT_DEVICE.items() if k != "compute_capability"}, r"'compute_capability' is missing"),
    ({k: v for k, v in TRT_DEVICE.items() if k != "tensorrt"}, r"'tensorrt\.min' is missing"),
    ({**TRT_DEVICE, "tensorrt": {"min": "8.5"}, "precisions": ["fp32"], "version_compatible": True},
     r"'version_compatible' needs TensorRT 8\.6"),
    ({**RTX_DEVICE, "precisions": ["best"]}, r"'best' needs builder precision flags"),
    ({**RTX_DEVICE, "int8_mode": "calibrator"}, r"'int8_mode: calibrator' is not available on TensorRT-RTX"),
    ({k: v for k, v in RTX_DEVICE.items() if k != "compute_capability"}, r"'compute_capability' is missing"),
    ({**RTX_DEVICE, "compute_capability": "9.0"}, r"does not run on compute capability 9\.0"),
    ({**RTX_DEVICE, "compute_capability": "8.6", "precisions": ["fp8"]}, r"'fp8' needs compute capability 8\.9"),
    ({**RTX_DEVICE, "hardware_compatibility": "ampere_plus"}, r"'hardware_compatibility' is unsupported"),
    ({**RTX_DEVICE, "version_compatible": True}, r"'version_compatible' is not available"),
])
def test_config_refusals(device, message):
    if message is None:
        load_device(device)  # accepted
        return
    with pytest.raises(KilnError, match=r"config: 'devices\.dev': .*" + message):
        load_device(device)


def test_valid_tensorrt_devices_load():
    cfg = load_device({**TRT_DEVICE, "precisions": ["fp32", "fp16", "bf16", "int8", "fp8", "best"],
                       "int8_mode": "calibrator", "compute_capability": "9.0"})
    # TensorRT 10 with a calibrator: everything but fp8 comes from the fp32 ONNX.
    assert cfg.precisions("yolo_demo", 17) == ["fp32", "fp8"]
    cfg11 = load_device({**TRT_DEVICE, "tensorrt": {"min": "11.0"}, "precisions": ["fp32", "fp16", "bf16", "int8"]})
    assert cfg11.precisions("yolo_demo", 17) == ["fp32", "fp16", "bf16", "int8"]
    jetson = load_device({**TRT_DEVICE, "compute_capability": "8.7", "tensorrt": {"min": "8.5"}, "jetson": True,
                          "dla_core": 1, "precisions": ["fp32", "fp16"], "int8_mode": "calibrator"})
    assert jetson.devices["dev"].dla_core == 1


def test_source_precision_by_tensorrt_version():
    t10 = device_of(TRT_DEVICE)
    t10_cal = device_of({**TRT_DEVICE, "int8_mode": "calibrator"})
    t11 = device_of({**TRT_DEVICE, "tensorrt": {"min": "11.0"}})
    assert [tensorrt.source_precision(p, t10) for p in ("fp32", "fp16", "bf16", "best", "int8", "fp8")] == \
        ["fp32", "fp32", "fp32", "fp32", "int8", "fp8"]
    assert tensorrt.source_precision("int8", t10_cal) == "fp32"
    assert [tensorrt.source_precision(p, t11) for p in ("fp32", "fp16", "bf16", "int8", "fp8")] == \
        ["fp32", "fp16", "bf16", "int8", "fp8"]
    assert tensorrt_rtx.source_precision("fp16", device_of(RTX_DEVICE)) == "fp16"


def test_build_settings_tensorrt_below_and_from_11():
    t10 = device_of(TRT_DEVICE)
    assert tensorrt.build_settings("fp16", t10, "10.13.0.35") == {
        "source_precision": "fp32", "strongly_typed": False, "precision_flags": {"fp16": True}, "calibrate": False}
    assert tensorrt.build_settings("bf16", t10, "10.13.0.35")["precision_flags"] == {"bf16": True}
    assert tensorrt.build_settings("int8", t10, "10.13.0.35") == {
        "source_precision": "int8", "strongly_typed": True, "precision_flags": {}, "calibrate": False}
    assert tensorrt.build_settings("fp8", t10, "10.13.0.35")["strongly_typed"] is True
    best = tensorrt.build_settings("best", t10, "10.13.0.35")
    assert best["precision_flags"] == {"fp16": True, "bf16": True, "int8": True} and best["calibrate"]
    cal = tensorrt.build_settings("int8", device_of({**TRT_DEVICE, "int8_mode": "calibrator"}), "10.13.0.35")
    assert cal == {"source_precision": "fp32", "strongly_typed": False, "precision_flags": {"int8": True},
                   "calibrate": True}
    t85 = device_of({**TRT_DEVICE, "compute_capability": "8.7", "tensorrt": {"min": "8.5"}, "jetson": True,
                     "precisions": ["fp16", "int8"], "int8_mode": "calibrator"})
    assert tensorrt.build_settings("best", t85, "8.5.2.2")["precision_flags"] == {"fp16": True, "int8": True}
    t11 = device_of({**TRT_DEVICE, "tensorrt": {"min": "11.0"}})
    assert tensorrt.build_settings("fp16", t11, "11.0.0") == {
        "source_precision": "fp16", "strongly_typed": True, "precision_flags": {}, "calibrate": False}


def test_parser_max_opset_table():
    assert importer.parser_max_opset("8.5.2") == 17
    assert importer.parser_max_opset("8.6.1") == 17
    assert importer.parser_max_opset("10.13.0.35") == 20
    assert importer.parser_max_opset("10.15") == 24
    assert importer.parser_max_opset("11.0") == 25
    assert importer.parser_max_opset("8.4") is None


# --------------------------------------------------------------------------------------------------
# The host and the guard


def test_guard_message_for_a_mismatched_host():
    device = device_of({**TRT_DEVICE, "compute_capability": "8.7", "tensorrt": {"min": "8.5"}, "jetson": True,
                        "precisions": ["fp16"]}, name="orin-jp5")
    h100 = HostInfo(compute_capability="9.0", gpu="NVIDIA H100 80GB HBM3", driver=True, tensorrt="10.13.0.35")
    expected = ("engine for device 'orin-jp5' needs compute capability 8.7 and TensorRT 8.5 on a Jetson; this host "
                "has 9.0 and TensorRT 10.13 on a discrete GPU: run this job on that device "
                "(README: Building on devices)")
    assert guard(device, h100) == expected
    assert tensorrt.check_host(device, h100) == expected
    assert tensorrt.check_build_host(device, h100) == expected
    orin = HostInfo(compute_capability="8.7", driver=True, jetson=True, tensorrt="8.5.2.2")
    assert guard(device, orin) is None
    assert tensorrt.check_host(device, HostInfo()) == "TensorRT is not installed on this host"


def test_guard_version_range_and_no_gpu():
    device = device_of({**TRT_DEVICE, "tensorrt": {"min": "10.8", "max": "10.13"}}, name="ada")
    assert guard(device, HostInfo(compute_capability="8.9", driver=True, tensorrt="10.9.0.34")) is None
    assert guard(device, HostInfo(compute_capability="8.9", driver=True, tensorrt="10.14.1")) == (
        "engine for device 'ada' needs compute capability 8.9 and TensorRT 10.8 to 10.13; this host has 8.9 "
        "and TensorRT 10.14: run this job on that device (README: Building on devices)")
    assert guard(device, HostInfo(tensorrt="10.13.0")) == (
        "engine for device 'ada' needs compute capability 8.9 and TensorRT 10.8 to 10.13; this host has no GPU "
        "and TensorRT 10.13: run this job on that device (README: Building on devices)")
    ampere_plus = device_of({**TRT_DEVICE, "hardware_compatibility": "ampere_plus"})
    assert guard(ampere_plus, HostInfo(compute_capability="8.6", driver=True, tensorrt="10.13.0")) is None
    assert "Ampere or newer" in guard(ampere_plus, HostInfo(compute_capability="7.5", driver=True, tensorrt="10.13"))


@pytest.fixture
def fresh_probe():
    """detect_host's GPU probe is cached per process: probe anew, and leave no made-up answer behind."""
    trt_host._probe_gpu.cache_clear()
    yield
    trt_host._probe_gpu.cache_clear()


def test_detect_host_without_gpu(monkeypatch, fresh_probe):
    monkeypatch.setattr(trt_host, "_probe_cuda_bindings", lambda: None)
    monkeypatch.setattr(trt_host, "_probe_nvidia_smi", lambda: None)
    host = detect_host()
    assert host.driver is False and host.compute_capability is None and host.gpu is None
    assert host.tensorrt_rtx == tensorrt_rtx.version()
    assert host.tensorrt == tensorrt.version()


def test_detect_host_reads_nvidia_smi(tmp_path, monkeypatch, fresh_probe):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=*) echo "NVIDIA GeForce RTX 4090, 8.9";; '
        '*) echo "| NVIDIA-SMI 550.54.14   Driver Version: 550.54.14   CUDA Version: 12.4 |";; esac\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(trt_host, "_probe_cuda_bindings", lambda: None)
    host = detect_host()
    assert (host.gpu, host.compute_capability, host.cuda_driver, host.driver, host.probe) == (
        "NVIDIA GeForce RTX 4090", "8.9", "12.4", True, "nvidia-smi")
    assert tensorrt_rtx.check_host(device_of(RTX_DEVICE), host) is None
    key = timing_cache_key(host, "10.13.0.35")
    assert key == "NVIDIA-GeForce-RTX-4090_sm89_cuda12.4_trt10.13.0.35"


def test_timing_cache_key_is_a_file_name():
    key = timing_cache_key(HostInfo(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                                               cuda_driver="12.8", tensorrt="10.13.0.35"))
    assert key == "NVIDIA-H100-80GB-HBM3_sm90_cuda12.8_trt10.13.0.35"
    assert "/" not in timing_cache_key(HostInfo(gpu="a/b c"))


# --------------------------------------------------------------------------------------------------
# Profiles


def _onnx_with_inputs(path: Path, inputs: dict[str, list]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    vis = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "orig_target_sizes" else TensorProto.FLOAT,
                                         dims) for n, dims in inputs.items()]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", [next(iter(inputs))], ["y"])], "g", vis, [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_default_profile_rtdetr_inputs(tmp_path):
    path = _onnx_with_inputs(tmp_path / "m.onnx", {"images": ["batch", 3, 64, 64], "orig_target_sizes": ["batch", 2]})
    device = device_of({**RTX_DEVICE, "batch_sizes": [1, 2]})
    assert profiles_for(device, path, validation_batch_size=16) == [{
        "images": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [16, 3, 64, 64]},
        "orig_target_sizes": {"min": [1, 2], "opt": [2, 2], "max": [16, 2]},
    }]


def test_profiles_dynamic_hw_and_configured(tmp_path):
    path = _onnx_with_inputs(tmp_path / "m.onnx", {"images": ["batch", 3, "h", "w"]})
    cfg = load_device(RTX_DEVICE)
    device = cfg.devices["dev"]
    with pytest.raises(KilnError, match="dynamic axis 2"):
        profiles_for(device, path)
    spec = cfg.models["yolo_demo"]
    prof = profiles_for(device, path, model_spec=spec)[0]["images"]
    assert prof["min"] == [1, 3, 256, 256] and prof["max"] == [8, 3, 256, 256]

    given = {**RTX_DEVICE, "profiles": [{"images": {"min": [1, 3, 32, 32], "opt": [2, 3, 64, 64],
                                                     "max": [4, 3, 128, 128]}}]}
    assert profiles_for(device_of(given), path)[0]["images"]["max"] == [4, 3, 128, 128]
    wrong = {**RTX_DEVICE, "profiles": [{"image": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32],
                                                   "max": [1, 3, 32, 32]}}]}
    with pytest.raises(KilnError, match=r"profiles\[0\]' names image, not inputs"):
        profiles_for(device_of(wrong), path)
    unordered = {**RTX_DEVICE, "profiles": [{"images": {"min": [4, 3, 32, 32], "opt": [1, 3, 32, 32],
                                                        "max": [8, 3, 32, 32]}}]}
    with pytest.raises(KilnError, match="min <= opt <= max"):
        profiles_for(device_of(unordered), path)


# --------------------------------------------------------------------------------------------------
# INT8 calibration feeds (TensorRT < 11): the data side runs without TensorRT


def test_calibration_batches(tmp_path):
    cfg = load_device(TRT_DEVICE)
    spec = cfg.models["yolo_demo"]  # calibration.images = 8
    n = 10
    npz = tmp_path / "calib.npz"
    np.savez(npz, images=np.full((n, 3, 4, 4), 255, np.uint8), image_ids=np.arange(n),
             orig_sizes=np.full((n, 2), 64), ratios=np.ones(n), pads=np.zeros((n, 2)))
    batches = list(tensorrt.calibration_batches(npz, spec, 3))
    assert [b["images"].shape[0] for b in batches] == [3, 3, 2]
    assert all(b["images"].dtype == np.float32 and b["images"].max() == 1.0 for b in batches)
    rtdetr = list(tensorrt.calibration_batches(npz, cfg.models["rtdetr_demo"], 8))
    assert set(rtdetr[0]) == {"images", "orig_target_sizes"}


def test_calibrator_needs_its_inputs(tmp_path):
    with pytest.raises(KilnError, match="calib_npz and model_spec"):
        tensorrt._calibrator_factory(tmp_path / "engine.engine", {})


# --------------------------------------------------------------------------------------------------
# TensorRT names used by the backends exist in the modules they are written for


def _package_modules() -> list:
    """Every module of kiln.backends.trt, the code both TensorRT backends share."""
    return [importlib.import_module(f"{trt_package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(trt_package.__path__)]


def _trt_attribute_uses(*modules) -> set[tuple[str, ...]]:
    """Attribute chains read off a TensorRT module named `trt` (or `<x>.trt`): trt.A.B -> (A, B).

    Dunders (__version__, __members__) are left out: every module and enum has them.
    """
    uses = set()
    for module in modules:
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "trt":
                rest = chain
            elif "trt" in chain[:-1]:
                rest = chain[chain.index("trt") + 1:]
            else:
                continue
            rest = tuple(a for a in rest[:2] if not a.startswith("__"))
            if rest:
                uses.add(rest)
    return uses


def test_rtx_names_exist_in_tensorrt_rtx():
    rtx = importer.import_trt("tensorrt-rtx")
    if rtx is None:
        pytest.skip(NO_RTX)
    missing = [".".join(u) for u in _trt_attribute_uses(*_package_modules(), tensorrt_rtx)
               if not hasattr(rtx, u[0]) or (len(u) == 2 and not hasattr(getattr(rtx, u[0]), u[1]))]
    assert missing == []


def _stub_names(stub_dir: Path) -> dict[str, set[str]]:
    """Top-level names of the TensorRT stubs, each class with its members.

    Read line by line, not with ast: tensorrt-stubs 10.13 holds signatures Python cannot parse
    (a non-default argument after default ones in INetworkDefinition.add_scale_nd).
    """
    names: dict[str, set[str]] = {}
    top = re.compile(r"^(?:class|def)\s+(\w+)|^(\w+)\s*[:=]")
    member = re.compile(r"^    (?:def\s+(\w+)|class\s+(\w+)|(\w+)\s*[:=])")
    for pyi in (stub_dir / "tensorrt_bindings").glob("*.pyi"):
        current = None
        for line in pyi.read_text().splitlines():
            m = top.match(line)
            if m:
                name = m.group(1) or m.group(2)
                names.setdefault(name, set())
                current = name if line.startswith("class") else None
                continue
            m = member.match(line)
            if m and current:
                names[current].add(next(g for g in m.groups() if g))
    return names


def test_tensorrt_names_exist_in_stubs():
    """Checks the TensorRT-only code against the tensorrt-stubs type stubs (TensorRT 10.13).

    Install them OUTSIDE the project's environment and point KILN_TRT_STUBS there:
    ``pip install --no-deps --target /tmp/trt-stubs tensorrt-stubs``. Inside the environment their
    empty ``tensorrt`` namespace package makes ModelOpt's int8/fp8 quantization fail.
    """
    stub_dir = Path(os.environ.get("KILN_TRT_STUBS", "/nonexistent"))
    if not (stub_dir / "tensorrt_bindings").is_dir():
        pytest.skip(f"{NO_TRT}: set KILN_TRT_STUBS to a folder holding tensorrt-stubs "
                    f"(pip install --no-deps --target DIR tensorrt-stubs) to check names against TensorRT 10")
    names = _stub_names(stub_dir)
    missing = [".".join(u) for u in _trt_attribute_uses(*_package_modules(), tensorrt)
               if u[0] not in names or (len(u) == 2 and u[1] not in names[u[0]])]
    assert missing == []


# --------------------------------------------------------------------------------------------------
# What needs full TensorRT or a GPU


def _host_device(backend: str) -> dict:
    host = detect_host()
    if not host.driver or not host.compute_capability:
        pytest.skip("this host has no GPU with a CUDA driver: engines cannot run here")
    if backend == "tensorrt":
        return {"backend": "tensorrt", "compute_capability": host.compute_capability,
                "tensorrt": {"min": importer.mm_str(importer.major_minor(host.tensorrt))},
                "precisions": ["fp32"], "batch_sizes": [1, 4]}
    return {**RTX_DEVICE, "compute_capability": host.compute_capability}


def _reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def test_tensorrt_build_and_run(onnx_models, tmp_path):
    if importer.import_trt("tensorrt") is None:
        pytest.skip(NO_TRT)
    device = device_of(_host_device("tensorrt"))
    engine = tmp_path / "engine.engine"
    with atomic_path(engine) as tmp:
        meta = tensorrt.build(onnx_models["fp32"], tmp, device, "fp32",
                              timing_cache=tmp_path / "timing.cache")
    assert meta["layers_source"] == "engine_inspector"
    assert (tmp_path / "timing.cache").is_file()
    runner = tensorrt.load_runner(engine, device)
    x = np.random.default_rng(1).random((4, 3, SIZE, SIZE), dtype=np.float32)
    out = runner.infer({"images": x})["output0"]
    np.testing.assert_allclose(out, _reference(onnx_models["fp32"], x), atol=1e-3)


@needs_rtx
def test_tensorrt_rtx_run(onnx_models, tmp_path):
    device = device_of(_host_device("tensorrt-rtx"))
    reason = tensorrt_rtx.check_host(device)
    if reason:
        pytest.skip(reason)
    engine = tmp_path / "engine.engine"
    with atomic_path(engine) as tmp:
        tensorrt_rtx.build(onnx_models["fp32"], tmp, device, "fp32")
    runner = tensorrt_rtx.load_runner(engine, device)
    x = np.random.default_rng(1).random((4, 3, SIZE, SIZE), dtype=np.float32)
    out = runner.infer({"images": x})["output0"]
    np.testing.assert_allclose(out, _reference(onnx_models["fp32"], x), atol=1e-3)


def test_kept_nodes_become_per_layer_precision_constraints_on_a_weakly_typed_network():
    """TensorRT < 11 (weak typing): a mixed variant's kept nodes held to fp16 layer by layer, with
    OBEY_PRECISION_CONSTRAINTS (kiln.backends.trt.builder.constrain_layers). Full TensorRT is not installable
    on this host, so the network, config and enums are fakes with TensorRT's API names (the names themselves
    are checked against the TensorRT 10 stubs by test_tensorrt_names_exist_in_stubs)."""
    import enum

    from kiln.backends.tensorrt import constrain_layers

    DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32")
    BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 OBEY_PRECISION_CONSTRAINTS")

    class Layer:
        def __init__(self, name, dtypes):
            self.name, self.precision, self.outputs, self.set = name, DataType.FLOAT, dtypes, {}
            self.num_outputs = len(dtypes)

        def get_output(self, j):
            return SimpleNamespace(dtype=self.outputs[j])

        def set_output_type(self, j, dtype):
            self.set[j] = dtype

    class Config:
        flags: set = set()

        def set_flag(self, flag):
            self.flags = self.flags | {flag}

    layers = [Layer("/backbone/Conv", [DataType.FLOAT]), Layer("/head/cls.0.2/Conv", [DataType.FLOAT]),
              Layer("/head/cls.0.2/Conv_1", [DataType.FLOAT]), Layer("/head/TopK", [DataType.FLOAT, DataType.INT32])]
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    ns = SimpleNamespace(trt=SimpleNamespace(DataType=DataType, BuilderFlag=BuilderFlag))
    config = Config()
    got = constrain_layers(ns, network, config, {"/head/cls.0.2/Conv": "fp16", "/head/TopK": "fp16",
                                                 "/head/cls.1.2/Conv": "fp16"})
    assert got == {"constrained": [{"layer": "/head/cls.0.2/Conv", "index": 1, "precision": "fp16", "outputs": [0]},
                                   {"layer": "/head/TopK", "index": 3, "precision": "fp16", "outputs": [0]}],
                   "unmatched": ["/head/cls.1.2/Conv"]}
    assert layers[1].precision == DataType.HALF and layers[1].set == {0: DataType.HALF}
    assert layers[3].set == {0: DataType.HALF}  # TopK's int32 indices keep their type
    assert layers[0].precision == DataType.FLOAT and layers[2].set == {}  # a name that only starts alike: not kept
    assert config.flags == {BuilderFlag.OBEY_PRECISION_CONSTRAINTS, BuilderFlag.FP16}
    config = Config()
    assert constrain_layers(ns, network, config, {"/nowhere": "fp16"})["constrained"] == [] and config.flags == set()


def test_the_tensorrt_build_hands_kept_nodes_to_the_builder_only_for_weakly_typed_builds(monkeypatch, tmp_path):
    """kiln.backends.tensorrt.build with kept_nodes: a network hook that applies constrain_layers on TensorRT < 11,
    none on 11 (strongly typed). TensorRT is not installable here: its module and the builder are fakes."""
    seen = {}
    monkeypatch.setattr(tensorrt, "import_trt", lambda flavor: SimpleNamespace(__version__=seen["version"]))
    monkeypatch.setattr(tensorrt.builder, "build_plan", lambda *a, **k: seen.update(hook=k["network_hook"]))
    monkeypatch.setattr(tensorrt, "constrain_layers", lambda ns, network, config, kept: {"kept": kept})
    for version, minimum, weak in (("8.5.2", "8.5", True), ("11.0.0", "11.0", False)):
        seen["version"] = version
        device = device_of({"backend": "tensorrt", "compute_capability": "8.7", "tensorrt": {"min": minimum},
                            "precisions": ["int8"], "int8_mode": "calibrator" if weak else "qdq",
                            "batch_sizes": [1]})
        tensorrt.build(tmp_path / "m.onnx", tmp_path / "e", device, "fp16", kept_nodes={"/a/Conv": "fp16"})
        assert (seen["hook"](None, None, None) == {"kept": {"/a/Conv": "fp16"}}) if weak else seen["hook"] is None
