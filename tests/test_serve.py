"""Stage serve: Triton model repositories and DeepStream nvinfer configs, checked against the engines.

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient ships model_config_pb2),
and the repository's detector is served for real by a tritonserver on loopback (nvidia-pytriton's binary,
installed beside Kiln by scripts/install_triton.sh: set KILN_TRITON_DIR and KILN_TRITON_SITE).
"""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kiln import backends, build, export, paths, serve
from kiln.backends import tensorrt_rtx
from kiln.config import load
from kiln.serve import deepstream, triton
from tests.conftest import REPO, random_checkpoints, tiny_config

CLASSES = ["circle", "square", "triangle"]
TRITON_DIR = os.environ.get("KILN_TRITON_DIR")
TRITON_SITE = os.environ.get("KILN_TRITON_SITE")
INSTALL_HINT = ("run scripts/install_triton.sh DIR, then set KILN_TRITON_DIR=DIR/server KILN_TRITON_SITE=DIR/site")


def _config(root: Path, rtx: bool) -> dict:
    raw = copy.deepcopy(tiny_config(str(root / "y.pt"), str(root / "r.pt")))
    raw["results"] = str(root / "results")
    raw["devices"] = {"cpu": {**raw["devices"]["cpu"], "precisions": ["fp32"], "batch_sizes": [1, 4]}}
    if rtx:
        raw["devices"]["rtx"] = {**tiny_config()["devices"]["rtx"], "precisions": ["fp32"], "batch_sizes": [1, 4],
                                 "models": ["yolo_demo"]}
    return raw


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Engines of the demo models (random weights) on ONNX Runtime, a TensorRT-RTX one where it builds here, and
    the serve stage's folders for each device."""
    root = tmp_path_factory.mktemp("serve")
    random_checkpoints(root / "y.pt", root / "r.pt")
    cfg = load(_config(root, tensorrt_rtx.is_available()), check_paths=False)
    for model in cfg.models:
        ann = Path(paths.fmt(paths.DATASET, results=cfg.results, dataset="demo", split="val"))
        ann.parent.mkdir(parents=True, exist_ok=True)
        # Ids not 0-based and listed out of order: names follow the sorted ids (Kiln's 0-based labels).
        ann.write_text(json.dumps({"images": [], "annotations": [],
                                   "categories": [{"id": 3, "name": CLASSES[2]}, {"id": 1, "name": CLASSES[0]},
                                                  {"id": 2, "name": CLASSES[1]}]}))
        variant = Path(paths.fmt(paths.VARIANT, results=cfg.results, model=model, opset=17, precision="fp32"))
        export.export_onnx(cfg.models[model], 17, variant)
    records = {}
    for dev, model, precision in cfg.jobs():
        key = {"results": cfg.results, "device": dev, "model": model, "precision": precision}
        record = Path(paths.fmt(paths.ENGINE_RECORD, **key))
        records[(dev, model, precision)] = build.build_engine(
            cfg, dev, model, precision, Path(PLAN_SOURCE(cfg, dev, model, precision)), record)
    out = {}
    for dev in cfg.devices:
        tri = Path(paths.fmt(paths.SERVE_TRITON, results=cfg.results, device=dev))
        ds = Path(paths.fmt(paths.SERVE_DEEPSTREAM, results=cfg.results, device=dev))
        out[dev] = serve.serve_device(cfg, dev, lambda p: p, tri, ds)
    return {"cfg": cfg, "records": records, "served": out, "root": root}


def PLAN_SOURCE(cfg, dev, model, precision):  # noqa: N802 - what Plan.engine_source gives
    d = cfg.devices[dev]
    return paths.fmt(paths.VARIANT, results=cfg.results, model=model, opset=d.opset, precision=d.variant_of(precision))


def model_config_pb2():
    """Triton's ModelConfig protobuf module, loaded from tritonclient's file (no grpcio needed)."""
    if not TRITON_SITE:
        pytest.skip(f"KILN_TRITON_SITE is not set: {INSTALL_HINT}")
    path = Path(TRITON_SITE) / "tritonclient" / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip(f"{path} is missing: {INSTALL_HINT}")
    spec = importlib.util.spec_from_file_location("kiln_test_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(pb2, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def _dims(pb_dims) -> tuple[int, ...]:
    return tuple(int(d) for d in pb_dims)


# --------------------------------------------------------------------------------------------------
# Triton


def test_every_config_parses_and_matches_its_engine(served):
    import onnx

    pb2 = model_config_pb2()
    cfg = served["cfg"]
    checked = 0
    for (dev, model, precision), rec in served["records"].items():
        assert rec["status"] == "built", rec
        d = cfg.devices[dev]
        fmt = backends.get(d.backend).serve_format(d)
        name = f"{model}_{precision}"
        folder = Path(paths.fmt(paths.SERVE_TRITON, results=cfg.results, device=dev)) / name
        mc = parse_config(pb2, folder / "config.pbtxt")
        assert mc.name == name and mc.platform == fmt.triton_platform
        assert (folder / "1" / fmt.triton_file).read_bytes() == Path(rec["engine"]).read_bytes()
        assert (folder / "labels.txt").read_text().split() == CLASSES
        graph = onnx.load(rec["engine"] if fmt.engine_is_onnx else rec["onnx"]).graph
        profiles = rec.get("profiles")
        if profiles:  # TensorRT-RTX: the profile's batch range
            batch = profiles[0]["images"]
            assert batch["min"][0] < batch["max"][0] and mc.max_batch_size == batch["max"][0]
        else:  # ONNX Runtime: dynamic batch in the graph, the device's largest batch size
            assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
            assert mc.max_batch_size == max(d.batch_sizes) == 4
        assert list(mc.dynamic_batching.preferred_batch_size) == [4]
        assert mc.instance_group[0].count == 1
        assert mc.instance_group[0].kind == (pb2.ModelInstanceGroup.KIND_CPU if dev == "cpu"
                                             else pb2.ModelInstanceGroup.KIND_GPU)
        inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        for pb_list, onnx_list in ((mc.input, inputs), (mc.output, graph.output)):
            assert [t.name for t in pb_list] == [t.name for t in onnx_list]
            for t, o in zip(pb_list, onnx_list):
                assert pb2.DataType.Name(t.data_type) == triton.TRITON_DTYPES[o.type.tensor_type.elem_type]
                shape = [x.dim_value if x.HasField("dim_value") else -1 for x in o.type.tensor_type.shape.dim]
                if profiles and t.name in profiles[0]:
                    p = profiles[0][t.name]
                    shape = [a if a == b else -1 for a, b in zip(p["min"], p["max"])]
                assert _dims(t.dims) == tuple(shape[1:])  # batched: Triton's dims leave the batch out
        checked += 1
    assert checked == len(served["records"])


def test_detector_config_parses(served):
    pb2 = model_config_pb2()
    cfg = served["cfg"]
    for dev, names in served["served"].items():
        for name in names:
            folder = Path(paths.fmt(paths.SERVE_TRITON, results=cfg.results, device=dev)) / (name + "_detector")
            mc = parse_config(pb2, folder / "config.pbtxt")
            assert mc.backend == "python" and mc.max_batch_size == 0
            assert [(t.name, pb2.DataType.Name(t.data_type), _dims(t.dims)) for t in mc.input] == [
                ("IMAGES", "TYPE_UINT8", (-1, -1, 3))]
            assert [(t.name, pb2.DataType.Name(t.data_type), _dims(t.dims)) for t in mc.output] == [
                ("BOXES", "TYPE_FP32", (-1, 4)), ("SCORES", "TYPE_FP32", (-1,)), ("CLASSES", "TYPE_INT32", (-1,))]
            assert mc.output[2].label_filename == "labels.txt"
            engine = folder / "1" / "engine"
            rec = json.loads((engine / "engine.json").read_text())
            assert (engine / "model.engine").read_bytes() == Path(rec["engine"]).read_bytes()
            assert json.loads((engine / "model.json").read_text())["class_names"] == CLASSES


def test_fixed_batch_and_streams(tmp_path):
    """A fixed batch gives max_batch_size 0 with the batch in dims; validation's best stream count the instances."""
    fixed = [triton.Tensor("images", "TYPE_FP32", (1, 3, 64, 64))]
    assert triton.max_batch_size({}, fixed, (1, 8)) == 0
    prof = {"profiles": [{"images": {"min": [2, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [2, 3, 64, 64]}}]}
    assert triton.max_batch_size(prof, triton.profile_shapes(fixed, prof["profiles"]), (1, 8)) == 0
    text = triton.config_text("m", platform="tensorrt_plan", max_batch=0, inputs=fixed, outputs=fixed,
                              preferred=[1, 8], instances=3, kind="KIND_GPU")
    pb2 = model_config_pb2()
    p = tmp_path / "config.pbtxt"
    p.write_text(text)
    mc = parse_config(pb2, p)
    assert mc.max_batch_size == 0 and _dims(mc.input[0].dims) == (1, 3, 64, 64)
    assert not mc.HasField("dynamic_batching") and mc.instance_group[0].count == 3
    v = tmp_path / "validation.json"
    assert triton.best_streams(v) == 1  # no validation yet
    v.write_text(json.dumps({"streams": {"best": 4}}))
    assert triton.best_streams(v) == 4


def test_failed_build_is_left_out(served, tmp_path):
    cfg = served["cfg"]
    key = {"results": cfg.results, "device": "cpu", "model": "yolo_demo", "precision": "fp32"}
    failed = tmp_path / "engine.json"
    failed.write_text(json.dumps({"status": "failed", "reason": "an op it cannot take"}))

    def local(p):
        return str(failed) if p == paths.fmt(paths.ENGINE_RECORD, **key) else p

    names = serve.serve_device(cfg, "cpu", local, tmp_path / "triton", tmp_path / "deepstream")
    assert names == ["rtdetr_demo_fp32"]
    assert sorted(p.name for p in (tmp_path / "triton").iterdir()) == ["rtdetr_demo_fp32", "rtdetr_demo_fp32_detector"]


def test_changed_engine_is_refused(served, tmp_path):
    from kiln.errors import KilnError

    cfg = served["cfg"]
    rec = served["records"][("cpu", "yolo_demo", "fp32")]
    damaged = tmp_path / "model.engine"
    damaged.write_bytes(Path(rec["engine"]).read_bytes()[:-10])

    def local(p):
        return str(damaged) if p == rec["engine"] else p

    with pytest.raises(KilnError, match=r"does not match its record .*rebuild it"):
        serve.serve_device(cfg, "cpu", local, tmp_path / "triton", tmp_path / "deepstream")
    assert not (tmp_path / "triton").exists()  # nothing that looks finished


# --------------------------------------------------------------------------------------------------
# DeepStream


def _ini(path: Path) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # nvinfer's keys are case-sensitive
    ini.read_string(path.read_text())
    return ini


def test_deepstream_config_matches_engine_and_model(served):
    cfg = served["cfg"]
    for (dev, model, precision), rec in served["records"].items():
        spec, d = cfg.models[model], cfg.devices[dev]
        fmt = backends.get(d.backend).serve_format(d)
        folder = Path(paths.fmt(paths.SERVE_DEEPSTREAM, results=cfg.results, device=dev)) / f"{model}_{precision}"
        ini = _ini(folder / "config_infer_primary.txt")
        prop, attrs = ini["property"], ini["class-attrs-all"]
        assert float(prop["net-scale-factor"]) == pytest.approx(1 / 255)
        assert prop["offsets"] == "0;0;0" and prop["model-color-format"] == "0"
        assert prop["network-mode"] == {"fp32": "0", "int8": "1", "fp16": "2"}[precision]
        assert prop["infer-dims"] == f"3;{spec.input_size[0]};{spec.input_size[1]}"
        max_batch = (rec["profiles"][0]["images"]["max"][0] if rec.get("profiles") else max(d.batch_sizes))
        assert int(prop["batch-size"]) == max_batch
        assert int(prop["num-detected-classes"]) == len(CLASSES)
        assert (folder / prop["labelfile-path"]).read_text().split() == CLASSES
        letterbox = spec.preprocess == "letterbox"
        assert prop["maintain-aspect-ratio"] == prop["symmetric-padding"] == str(int(letterbox))
        assert letterbox == (spec.layout == "yolo")
        if spec.layout == "yolo" and spec.nms == "none":
            assert prop["cluster-mode"] == "2" and prop["parse-bbox-func-name"] == "NvDsInferParseYolo"
            assert float(attrs["nms-iou-threshold"]) == spec.decode["iou_threshold"]
        else:
            assert prop["cluster-mode"] == "4" and "nms-iou-threshold" not in attrs
            assert prop["parse-bbox-func-name"] == "NvDsInferParseCustomDETR"
        assert float(attrs["pre-cluster-threshold"]) == spec.decode["conf_threshold"]
        assert int(attrs["topk"]) == spec.decode["max_det"]
        if fmt.nvinfer_engine:  # the plan in the Triton repository, relative to the config
            engine = (folder / prop["model-engine-file"]).resolve()
            assert engine.read_bytes() == Path(rec["engine"]).read_bytes() and "onnx-file" not in prop
        else:  # nvinfer builds its own engine from the precision variant
            assert (folder / prop["onnx-file"]).read_bytes() == Path(rec["onnx"]).read_bytes()
            assert "model-engine-file" not in prop


def test_deepstream_modes_and_parsers():
    cfg = load(tiny_config(), check_paths=False)
    yolo = cfg.models["yolo_demo"]
    from dataclasses import replace

    with_nms = replace(yolo, nms="onnx")
    text = deepstream.config_text(spec=with_nms, precision="int8", batch_size=8, num_classes=3,
                                  engine_file="model.plan", onnx_file=None, calib_file="calibration.cache")
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    assert ini["property"]["network-mode"] == "1" and ini["property"]["cluster-mode"] == "4"
    assert ini["property"]["parse-bbox-func-name"] == "NvDsInferParseCustomEfficientNMS"
    assert ini["property"]["int8-calib-file"] == "calibration.cache"
    assert deepstream.NETWORK_MODES["fp16"] == 2 and deepstream.NETWORK_MODES["bf16"] == 0


# --------------------------------------------------------------------------------------------------
# Served for real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tritonserver_serves_the_detector(served, tmp_path):
    if not TRITON_DIR or not TRITON_SITE:
        pytest.skip(f"KILN_TRITON_DIR / KILN_TRITON_SITE not set: {INSTALL_HINT}")
    server = Path(TRITON_DIR) / "bin" / "tritonserver"
    stub = Path(TRITON_DIR) / "backends" / "python" / "triton_python_backend_stub"
    if not server.is_file() or not stub.is_file():
        pytest.skip(f"{server} or {stub} is missing: {INSTALL_HINT}")
    try:  # --help prints the options and exits 1; a binary this host cannot load fails otherwise
        probe = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=30)
    except OSError as err:
        pytest.skip(f"tritonserver cannot run on this host: {err}")
    if "--model-repository" not in probe.stdout + probe.stderr:
        pytest.skip(f"tritonserver cannot run on this host: {(probe.stderr or probe.stdout).strip()[-300:]}")
    sys.path.insert(0, TRITON_SITE)
    try:
        import tritonclient.http as httpclient
    finally:
        sys.path.remove(TRITON_SITE)

    cfg = served["cfg"]
    # A repository of one model: the detector of the ONNX Runtime CPU yolo engine.
    name = "yolo_demo_fp32_detector"
    src = Path(paths.fmt(paths.SERVE_TRITON, results=cfg.results, device="cpu")) / name
    repo = tmp_path / "repo"
    shutil.copytree(src, repo / name)
    (repo / name / "1" / "kiln.json").write_text(json.dumps({"kiln_root": str(REPO)}))

    from kiln.runtime import Detector

    local = Detector.load(repo / name / "1" / "engine")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((200, 300), (256, 256), (97, 143))]
    expected = local.predict(images)

    port = _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") + (
        ":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else ""),
        # The stub's embedded Python finds the virtualenv through python3 on PATH.
        "PATH": str(Path(sys.executable).parent) + ":" + os.environ.get("PATH", "")}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(server), f"--model-repository={repo}", f"--backend-directory={Path(TRITON_DIR) / 'backends'}",
             "--http-address=127.0.0.1", f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false",
             "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
             "--exit-timeout-secs=5", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
             f"--backend-config=python,shm-region-prefix-name=kilntest{os.getpid()}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = None
    try:
        ready = False
        for _ in range(300):  # up to 30 s
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                    ready = r.status == 200
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(0.1)
        assert ready, f"tritonserver not ready (exit {proc.poll()}): {log.read_text()[-3000:]}"
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", connection_timeout=10, network_timeout=60)
        for image, want in zip(images, expected):
            x = httpclient.InferInput("IMAGES", list(image.shape), "UINT8")
            x.set_data_from_numpy(image, binary_data=True)
            outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("BOXES", "SCORES", "CLASSES")]
            got = client.infer(name, [x], outputs=outs)
            boxes, scores, classes = got.as_numpy("BOXES"), got.as_numpy("SCORES"), got.as_numpy("CLASSES")
            assert len(scores) == len(want.scores) > 0
            np.testing.assert_array_equal(boxes, np.asarray(want.boxes, dtype=np.float32))
            np.testing.assert_array_equal(scores, np.asarray(want.scores, dtype=np.float32))
            np.testing.assert_array_equal(classes, np.asarray(want.class_ids, dtype=np.int32))
    finally:
        if client is not None:
            client.close()  # an open keep-alive connection makes the server wait out --exit-timeout-secs
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        local.close()
    assert proc.returncode == 0, log.read_text()[-3000:]
