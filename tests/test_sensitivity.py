"""Layer sensitivity, the mixed fallback variant, and the engine to deploy (docs/accuracy.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln import findings, sensitivity
from kiln.config import load
from kiln.errors import KilnError
from kiln.specs import base_precision


def _qdq_model() -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(w: Q/DQ) -> y, and x -> Relu (not quantized) -> z."""
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="xd"),
        helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="wq"),
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="wd"),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="/head/cls.0/cls.0.2/Conv"),
        helper.make_node("Relu", ["x"], ["z"], name="/Relu"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, 2]) for n in ("x", "y", "z")]
    g = helper.make_graph(nodes, "g", [vi[0]], vi[1:], [w, s, zp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def test_regions_are_the_quantized_nodes_and_bypass_restores_their_inputs():
    import onnxruntime as ort

    m = _qdq_model()
    found = sensitivity.regions(m)
    assert [(r["node"], r["op_type"], r["block"], r["quantized_inputs"]) for r in found] == [
        ("/head/cls.0/cls.0.2/Conv", "Conv", "/head/cls.0", 2)]
    x = np.array([[[[0.123, 0.456], [1.0, -0.77]]]], np.float32)

    def y(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["y"], {"x": x})[0]

    assert not np.allclose(y(m), x)  # 0.1 steps: quantized
    kept = sensitivity.bypass(m, {"/head/cls.0/cls.0.2/Conv"})
    np.testing.assert_allclose(y(kept), x, rtol=1e-6)  # weight 1 in fp32, input unquantized
    assert [n.input[:2] for n in kept.graph.node if n.op_type == "Conv"] == [["x", "w"]]
    assert [n.input[:2] for n in m.graph.node if n.op_type == "Conv"] == [["xd", "wd"]]  # the original untouched


def test_block_names_follow_the_surgery_graph_scopes():
    assert sensitivity.block_of("/backbone/stage2/stage2.0/conv/Conv") == "/backbone/stage2"
    assert sensitivity.block_of("/Add_8") == "/Add_8"


def _row(precision, latency, map_, status="passed", device="cpu", model="m"):
    return {"model": model, "device": device, "precision": precision, "status": status,
            "latency_median_ms": latency, "map50_95": map_, "batch_size": 1, "reason": None}


def test_deploy_names_the_fastest_passing_engine_and_flags_lower_precisions_that_are_not_faster():
    rows = [_row("fp32", 30.0, 0.80), _row("fp16", 32.0, 0.80), _row("int8", 20.0, 0.50, "failed"),
            _row("int8-mixed", 25.0, 0.79)]
    slow = findings.not_faster(rows)
    assert slow == {("m", "cpu", "fp16"): "fp16 is not faster than fp32 on cpu (32.00 ms against 30.00 ms median "
                                          "at batch 1)"}
    (d,) = findings.deploy(rows)
    assert d["deploy"] == "int8-mixed" and d["latency_median_ms"] == 25.0
    assert [p["precision"] for p in d["pareto"]] == ["int8", "int8-mixed", "fp32"]  # fp16: slower, no better
    assert d["not_faster"] == [slow[("m", "cpu", "fp16")]]
    rows[1]["latency_median_ms"] = 40.0
    rows.append(_row("int8", 45.0, 0.80, device="gpu"))
    rows.append(_row("fp16", 41.0, 0.80, device="gpu"))
    assert findings.not_faster(rows)[("m", "gpu", "int8")].startswith("int8 is not faster than fp16 on gpu")
    none = findings.deploy([_row("int8", 20.0, 0.5, "failed")])[0]
    assert none["deploy"] is None and none["why"] == "no engine of this model passes every gate on this device"
    # A device nothing was validated on (another host's): no verdict on its gates, the reason instead.
    away = findings.deploy([_row("fp16", None, None, "not run"), _row("fp32", None, None, "built")])[0]
    assert away["deploy"] is None
    assert away["why"] == "not validated on this host: no engine of this model was measured here (rows: built, not run)"


def test_hints_name_the_config_keys():
    failed = _row("int8", 20.0, 0.5, "failed")
    hint = findings.sensitivity_hint(failed, ("fp32", "int8"))
    assert "models.m.sensitivity.precisions: [int8]" in hint and "add int8-mixed to devices.cpu.precisions" in hint
    assert findings.sensitivity_hint(_row("int8", 20.0, 0.5), ("int8",)) is None
    fp16 = _row("fp16", 20.0, 0.5, "failed")
    assert "set devices.cpu.tf32: false" in findings.tf32_hint(fp16, {"options": {"tf32": True}})
    assert findings.tf32_hint(fp16, {"options": {"tf32": False}}) is None
    assert findings.tf32_hint(_row("int8", 1.0, 0.5, "failed"), {"options": {"tf32": True}}) is None


def test_mixed_precision_names(config_dict):
    assert base_precision("int8-mixed") == "int8" and base_precision("fp16") == "fp16"
    config_dict["devices"]["cpu"]["precisions"] = ["fp32", "int8", "int8-mixed"]
    config_dict["models"]["yolo_demo"]["sensitivity"] = {"precisions": ["int8"], "max_nodes": 3}
    cfg = load(config_dict, check_paths=False)
    assert cfg.devices["cpu"].variant_of("int8-mixed") == "int8-mixed"
    assert ("cpu", "yolo_demo", "int8-mixed") in cfg.jobs()
    assert ("yolo_demo", 17, "int8") in sensitivity.wanted(cfg)
    assert "results/sensitivity/yolo_demo/opset17/int8.md" in sensitivity.targets(cfg)


def test_mixed_variant_on_a_device_that_builds_int8_from_fp32_is_built_from_fp32_with_layer_constraints(
        config_dict, tmp_path):
    """TensorRT 8.5, int8 by calibrator (weakly typed): int8-mixed is built from the fp32 ONNX, calibrated like
    int8, and its kept nodes (the int8-mixed variant's record, which is still made) go to the build."""
    from kiln import build, workflow
    from kiln.util import write_json

    config_dict["devices"] = {"orin": {"backend": "tensorrt", "compute_capability": "8.7",
                                       "tensorrt": {"min": "8.5", "max": "8.5"}, "opset": 16, "jetson": True,
                                       "precisions": ["int8", "int8-mixed"], "int8_mode": "calibrator",
                                       "batch_sizes": [1]}}
    cfg = load(config_dict, check_paths=False)
    d = cfg.devices["orin"]
    assert d.variant_of("int8-mixed") == "fp32" and d.variant_of("int8") == "fp32"
    assert cfg.precisions("yolo_demo", 16) == ["fp32", "int8-mixed"]  # the mixed variant: its kept list
    record = "results/onnx/yolo_demo/opset16/int8-mixed.json"
    assert workflow.kept_records(cfg, "orin", "yolo_demo", "int8-mixed") == [record]
    assert workflow.kept_records(cfg, "orin", "yolo_demo", "int8") == []
    assert record in workflow.summary_records(cfg, {"orin": None}, {"orin": None})
    write_json(tmp_path / "int8-mixed.json", {"fallback": {"strict": "int8", "kept": [
        {"node": "/head/cls.0.2/Conv"}, {"node": "/head/cls.1.2/Conv"}]}})
    assert build.kept_nodes(tmp_path / "int8-mixed.json") == {"/head/cls.0.2/Conv": "fp16", "/head/cls.1.2/Conv": "fp16"}


def test_mixed_variant_on_a_backend_that_cannot_constrain_layers_is_refused(config_dict, monkeypatch):
    from kiln.backends import tensorrt

    monkeypatch.setattr(tensorrt.TensorRT, "constrains_layers", lambda self, device: False)
    config_dict["devices"] = {"orin": {"backend": "tensorrt", "compute_capability": "8.7",
                                       "tensorrt": {"min": "8.5", "max": "8.5"}, "opset": 16, "jetson": True,
                                       "precisions": ["int8", "int8-mixed"], "int8_mode": "calibrator",
                                       "batch_sizes": [1]}}
    with pytest.raises(KilnError, match=r"'devices.orin.precisions' lists int8-mixed, but this device builds int8 "
                                        r"from the fp32 ONNX .*remove int8-mixed or build int8 from Q/DQ"):
        load(config_dict, check_paths=False)


def test_sensitivity_images_beyond_the_calibration_split_are_refused(config_dict):
    config_dict["models"]["yolo_demo"]["sensitivity"] = {"images": 99}
    with pytest.raises(KilnError, match=r"'models.yolo_demo.sensitivity.images' is 99 but dataset 'demo' has "
                                        r"calib.count 8: lower one or raise the other"):
        load(config_dict, check_paths=False)


@pytest.mark.integration
def test_the_sensitive_example_end_to_end(tmp_path):
    """examples/sensitive.yaml, smaller: strict int8 fails its gate on ONNX Runtime CPU, the sensitivity table
    ranks the outlier's class-branch Convs first, int8-mixed keeps them in fp16 and passes; the summary says so
    and names the engine to deploy. About two minutes on two busy cores (sensitivity: 44 regions one at a time)."""
    import shutil
    import subprocess
    import sys

    import yaml

    from kiln.util import read_json
    from tests.conftest import REPO

    if not (REPO / "models" / "demo_yolo.pt").is_file():
        pytest.skip("committed checkpoint models/demo_yolo.pt is missing")
    (tmp_path / "models").mkdir()
    shutil.copy(REPO / "models" / "demo_yolo.pt", tmp_path / "models" / "demo_yolo.pt")
    config = yaml.safe_load((REPO / "examples" / "sensitive.yaml").read_text())
    config["devices"]["cpu"]["precisions"] = ["int8", "int8-mixed"]
    # A limit no try reaches (the CPU figures of a busy host are noisy): the fallback times each try all the same.
    config["models"]["yolo_sensitive"]["sensitivity"]["max_latency_loss"] = 10.0
    config["validation"]["latency"] = {"warmup_ms": 10, "min_iterations": 5, "min_seconds": 0.05}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = read_json(tmp_path / "results/sensitivity/yolo_sensitive/opset17/int8.json")
    assert table["split"] == "calib" and not table["strict"]["passed"]
    assert table["regions"][0]["node"].startswith("/head/cls.")
    record = read_json(tmp_path / "results/onnx/yolo_sensitive/opset17/int8-mixed.json")
    kept = [k["node"] for k in record["fallback"]["kept"]]
    assert record["fallback"]["passed_on_calib"] and 1 <= len(kept) <= 6
    assert all(k.startswith("/head/cls.") for k in kept)
    assert record["fallback"]["stopped_by"] == "gate passed"
    assert record["fallback"]["cpu_latency"]["strict_median_ms"] > 0 and record["fallback"]["cpu_latency"]["within_limit"]
    rows = {r["precision"]: r for r in read_json(tmp_path / "results/report/summary.json")["rows"]}
    assert rows["int8"]["status"] == "failed" and "map50 drop" in rows["int8"]["reason"]
    assert "add int8-mixed to devices.cpu.precisions" in rows["int8"]["hint"]
    assert rows["int8-mixed"]["status"] == "passed" and kept[0] in rows["int8-mixed"]["kept"]
    assert rows["int8-mixed"]["latency_given_up"] == pytest.approx(
        rows["int8-mixed"]["latency_median_ms"] / rows["int8"]["latency_median_ms"] - 1, abs=1e-4)
    deploy = read_json(tmp_path / "results/report/summary.json")["deploy"]
    assert [(d["model"], d["device"], d["deploy"]) for d in deploy] == [("yolo_sensitive", "cpu", "int8-mixed")]
    assert "## Engine to deploy" in (tmp_path / "results/report/summary.md").read_text()
    assert "Engine to deploy" in (tmp_path / "results/report/kiln.md").read_text()


def test_latency_given_up_is_mixed_over_strict_at_batch_1_and_flagged_over_the_limit():
    rows = [_row("int8", 20.0, 0.5, "failed"), _row("int8-mixed", 25.0, 0.79), _row("fp16", 30.0, 0.8),
            _row("int8", 10.0, 0.5, device="gpu"), _row("int8-mixed", 10.5, 0.79, device="gpu")]
    got = findings.latency_given_up(rows, {"m": 0.10})
    assert set(got) == {("m", "cpu", "int8-mixed"), ("m", "gpu", "int8-mixed")}
    cpu, gpu = got[("m", "cpu", "int8-mixed")], got[("m", "gpu", "int8-mixed")]
    assert cpu["loss"] == 0.25 and cpu["over"] and cpu["note"] == (
        "int8-mixed gives up 25.0% latency against int8 on cpu (25.00 ms against 20.00 ms median at batch 1), "
        "over models.m.sensitivity.max_latency_loss 0.1")
    assert gpu["loss"] == 0.05 and not gpu["over"] and "max_latency_loss" not in gpu["note"]
    assert not findings.latency_given_up(rows)[("m", "cpu", "int8-mixed")]["over"]  # no limit: shown, never flagged
    rows[1]["batch_size"] = 8  # another batch size than the strict row's batch 1: not compared
    assert ("m", "cpu", "int8-mixed") not in findings.latency_given_up(rows, {"m": 0.1})
    cpu_plan, _gpu_plan = findings.deploy(rows, {"m": 0.1})
    assert cpu_plan["latency_given_up"] == []
    assert findings.deploy(rows[3:], {"m": 0.01})[0]["latency_given_up"][0]["over"]


def _fake_fallback(monkeypatch, tmp_path, config_dict, losses: dict[int, float], passes_at: int,
                   max_latency_loss=None, max_nodes=8):
    """make_mixed with ModelOpt, the judge and the CPU timer replaced: try k passes the gate from `passes_at`
    on and is slower than the strict variant by losses[k]. Returns the record."""
    from kiln.precision import fallback
    from kiln.util import write_json

    config_dict["devices"] = {"cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["int8", "int8-mixed"],
                                      "batch_sizes": [1]}}
    config_dict["models"]["yolo_demo"]["sensitivity"] = {
        "max_nodes": max_nodes, **({"max_latency_loss": max_latency_loss} if max_latency_loss is not None else {})}
    cfg = load(config_dict, check_paths=False)
    npz = tmp_path / "calib.npz"
    np.savez(npz, images=np.zeros((2, 3, 8, 8), np.uint8), image_ids=np.arange(2), orig_sizes=np.ones((2, 2)),
             ratios=np.ones(2), pads=np.zeros((2, 2)))
    strict = {"error": 0.5, "passed": False, "failures": ["mAP50 drop 0.5 > 0.05"]}
    regions = [{"node": f"/n{i}", "op_type": "Conv", "block": f"/n{i}", "rank": i + 1, "error_added": 0.1 - i / 100}
               for i in range(6)]
    write_json(tmp_path / "int8.json", {"regions": regions, "strict": strict, "estimate": 1})

    def make_variant(src, out, options, calib, log):
        out.write_text(str(len(options.nodes_to_exclude)))  # the try's k, read back by the fakes below
        return {"nodes_to_exclude": list(options.nodes_to_exclude)}

    class FakeJudge:
        def measure(self, path):
            ok = int(path.read_text()) >= passes_at
            return {"error": 0.0 if ok else 0.3, "passed": ok, "failures": [] if ok else ["scores 0.9 < 0.98"]}

    monkeypatch.setattr(fallback, "make_variant", make_variant)
    monkeypatch.setattr(fallback.Judge, "on_fp32", classmethod(lambda cls, *a, **k: FakeJudge()))
    monkeypatch.setattr(fallback, "brief", lambda res: {k: res[k] for k in ("error", "passed", "failures")})
    (tmp_path / "strict.onnx").write_text("0")
    monkeypatch.setattr(fallback, "cpu_median_ms",
                        lambda path, feeds, threads=0: 10.0 * (1 + losses.get(int(Path(path).read_text()), 0.0)))
    return fallback.make_mixed(cfg, "yolo_demo", "int8-mixed", tmp_path / "fp32.onnx", tmp_path / "int8-mixed.onnx",
                               tmp_path / "int8-mixed.json", npz, tmp_path / "ann.json", tmp_path / "int8.json",
                               strict_onnx=tmp_path / "strict.onnx")["fallback"]


def test_the_fallback_stops_before_the_latency_limit_and_records_the_cpu_estimates(monkeypatch, tmp_path, config_dict):
    # Passing needs 4 nodes, but 3 already give up 30% on this host's CPU, over the limit of 25%: 2 are kept.
    fb = _fake_fallback(monkeypatch, tmp_path, config_dict, {1: 0.05, 2: 0.2, 3: 0.3, 4: 0.4}, passes_at=4,
                        max_latency_loss=0.25)
    assert fb["stopped_by"] == "max_latency_loss" and not fb["passed_on_calib"]
    assert [k["node"] for k in fb["kept"]] == ["/n0", "/n1"]
    assert [(t["kept"], t["cpu_latency_loss"]) for t in fb["tries"]] == [(1, 0.05), (2, 0.2), (3, 0.3)]
    lat = fb["cpu_latency"]
    assert lat["strict_median_ms"] == 10.0 and lat["loss"] == 0.2 and lat["within_limit"]
    assert lat["note"].startswith("CPU-host estimates: ONNX Runtime CPU at batch 1")
    assert "keeping 3 would give up 30.0% CPU latency against strict int8, over models.yolo_demo.sensitivity." \
           "max_latency_loss 0.25" in fb["why"]
    assert (tmp_path / "int8-mixed.onnx").read_text() == "2"  # the variant is the last try within the limit


def test_the_fallback_without_a_latency_limit_times_nothing_and_stops_at_the_gate_or_max_nodes(
        monkeypatch, tmp_path, config_dict):
    fb = _fake_fallback(monkeypatch, tmp_path, config_dict, {3: 5.0}, passes_at=3)
    assert fb["stopped_by"] == "gate passed" and fb["passed_on_calib"] and len(fb["kept"]) == 3
    assert "cpu_latency" not in fb and "cpu_latency_loss" not in fb["tries"][0] and fb["max_latency_loss"] is None
    fb = _fake_fallback(monkeypatch, tmp_path, config_dict, {}, passes_at=9, max_nodes=2, max_latency_loss=0.5)
    assert fb["stopped_by"] == "max_nodes" and len(fb["kept"]) == 2 and fb["cpu_latency"]["within_limit"]
    # Even the first try is over the limit: it is the variant, said to be over.
    fb = _fake_fallback(monkeypatch, tmp_path, config_dict, {1: 0.9}, passes_at=1, max_latency_loss=0.5)
    assert fb["stopped_by"] == "max_latency_loss" and len(fb["kept"]) == 1 and not fb["cpu_latency"]["within_limit"]
    assert "no try is within it" in fb["why"]


def test_a_latency_limit_that_is_not_a_positive_fraction_is_refused(config_dict):
    config_dict["models"]["yolo_demo"]["sensitivity"] = {"max_latency_loss": 0}
    with pytest.raises(KilnError, match=r"'models.yolo_demo.sensitivity.max_latency_loss': 0 is less than or equal "
                                        r"to the minimum of 0"):
        load(config_dict, check_paths=False)


def test_bf16_sensitivity_is_refused_where_onnx_runtime_cpu_cannot_run_bf16(config_dict):
    from kiln.backends.ort_capabilities import capabilities

    if capabilities("CPUExecutionProvider")["bf16"].runs:
        pytest.skip("this ONNX Runtime runs bf16 on CPU: nothing to refuse")
    config_dict["models"]["yolo_demo"]["sensitivity"] = {"precisions": ["bf16"]}
    with pytest.raises(KilnError, match=r"^config: 'models.yolo_demo.sensitivity.precisions' lists bf16, but ONNX "
                                        r"Runtime's CPU provider, on which rule sensitivity judges variants, cannot "
                                        r"run bf16 here \(probed on onnxruntime .*NOT_IMPLEMENTED.*\): remove bf16 "
                                        r"from the list$"):
        load(config_dict, check_paths=False)


# --------------------------------------------------------------------------- fp16: the emulation, ranking, fp16-mixed

X300 = 300.0 + np.array([0.01, 0.1, 0.3, 0.37, 0.6, 0.77, 0.9, 0.13], np.float32).reshape(1, 1, 2, 4)


def _r(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def fp16_pair(tmp_path_factory):
    """A tiny fp32 graph whose first node is fp16-sensitive on purpose (images - 300: a large value minus a large
    value, where fp16's step is 0.25), and its fp16 variant made by rule precision's AutoCast (kiln.precision.cast)."""
    from kiln.precision.cast import make_variant
    from kiln.precision.options import PrecisionOptions

    def c(name, v):
        return numpy_helper.from_array(np.array(v, np.float32), name)

    nodes = [helper.make_node("Sub", ["images", "c300"], ["d"], name="/sensitive/Sub"),
             helper.make_node("Mul", ["d", "c2"], ["e"], name="/a/Mul"),
             helper.make_node("Add", ["e", "c1"], ["f"], name="/b/Add"),
             helper.make_node("Relu", ["f"], ["h"], name="/c/Relu"),
             helper.make_node("Mul", ["h", "c2"], ["y"], name="/d/Mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 4])],
                          [c("c300", 300.0), c("c2", 2.0), c("c1", 1.0)])
    d = tmp_path_factory.mktemp("fp16")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "fp32.onnx"))
    make_variant(d / "fp32.onnx", d / "fp16.onnx", PrecisionOptions("fp16"), calib=None, log=lambda s: None)
    return d / "fp32.onnx", d / "fp16.onnx"


def _y(model, optimize=True):
    from kiln.judge import session

    return session(model, optimize=optimize).run(["y"], {"images": X300})[0]


def test_the_fp16_emulation_rounds_what_the_variant_stores_in_fp16_and_ort_cpu_keeps_its_casts(fp16_pair):
    from kiln import fp16_emulation

    fp32, fp16 = (onnx.load(str(p)) for p in fp16_pair)
    storage = fp16_emulation.fp16_storage(fp16)
    assert "/sensitive/Sub" in storage and storage["/sensitive/Sub"][0] == {0, 1}  # AutoCast keeps node names
    regions = fp16_emulation.regions(fp16, fp32)
    assert [r["node"] for r in regions] == [n for n in ("/sensitive/Sub", "/a/Mul", "/b/Add", "/d/Mul")
                                            if n in storage]  # graph order, Relu (a move) not ranked
    em = fp16_emulation.emulate(fp32, storage)
    onnx.checker.check_model(em)
    # What the variant computes with fp16 storage and fp32 arithmetic, in numpy, node by node.
    d = _r(_r(X300) - 300) if "/sensitive/Sub" in storage else X300 - 300
    d = _r(d) if "/a/Mul" in storage else d
    h = np.maximum(d * 2 + 1, 0)
    want = _r(_r(h) * 2) if "/d/Mul" in storage else h * 2
    for optimize in (False, True):  # the Cast pairs survive ORT_DISABLE_ALL and ORT's default optimisation alike
        np.testing.assert_array_equal(_y(em, optimize), want)
    exact = _y(fp32)
    assert np.abs(_y(em, False) - exact).max() > 0.05  # fp16 rounding of 300.x: steps of 0.25
    kept = fp16_emulation.emulate(fp32, storage, keep={"/sensitive/Sub"})
    assert np.abs(_y(kept, False) - exact).max() < 0.01  # the sensitive node left fp32: the rounding is gone
    assert [n.op_type for n in fp32.graph.node] == ["Sub", "Mul", "Add", "Relu", "Mul"]  # the original untouched


class _MaxAbsJudge:
    """A judge of the tiny graph: error = the largest absolute difference from fp32 on X300, gate 0.01."""

    reference_accuracy = {"map50_95": 1.0, "map50": 1.0}

    def __init__(self, fp32):
        self.exact = _y(onnx.load(str(fp32)))
        self.runs = []

    def measure(self, model, optimize=True):
        if isinstance(model, (str, Path)):
            model = onnx.load(str(model))
        self.runs.append(optimize)
        err = float(np.abs(_y(model, optimize) - self.exact).max())
        return {"error": round(err, 9), "passed": err < 0.01, "failures": [] if err < 0.01 else [f"error {err}"],
                "seconds": 0.0}


def _brief(res):
    return {k: res[k] for k in ("error", "passed", "failures", "seconds")}


def test_fp16_ranking_on_the_emulation_finds_the_sensitive_node_first(fp16_pair, monkeypatch):
    monkeypatch.setattr(sensitivity, "brief", _brief)
    judge = _MaxAbsJudge(fp16_pair[0])
    table = sensitivity.rank_fp16(judge, *(onnx.load(str(p)) for p in fp16_pair), max_nodes=3, log_=lambda s: None)
    assert not table["strict"]["passed"] and table["strict"]["error"] > 0.05
    first = table["regions"][0]
    assert (first["node"], first["op_type"], first["block"], first["rank"]) == ("/sensitive/Sub", "Sub",
                                                                                "/sensitive/Sub", 1)
    assert first["error_added"] > 0.05 and first["kept"]["passed"]
    assert all(r["error_added"] < first["error_added"] for r in table["regions"][1:])
    assert table["estimate"] == 1 and table["cumulative"][0]["top"] == 1
    assert judge.runs and not any(judge.runs)  # every emulation judged at ORT_DISABLE_ALL


def test_fp16_mixed_keeps_the_sensitive_node_in_fp32_and_passes_where_strict_fails(fp16_pair, monkeypatch, tmp_path,
                                                                                    config_dict):
    from kiln.precision import fallback
    from kiln.util import write_json

    config_dict["devices"] = {"cpu": {"backend": "onnxruntime", "opset": 17, "batch_sizes": [1],
                                      "precisions": ["fp32", "fp16", "fp16-mixed"]}}
    config_dict["models"]["yolo_demo"]["sensitivity"] = {"precisions": ["fp16"], "max_nodes": 3}
    cfg = load(config_dict, check_paths=False)
    assert ("yolo_demo", 17, "fp16") in sensitivity.wanted(cfg)
    assert cfg.precisions("yolo_demo", 17) == ["fp32", "fp16", "fp16-mixed"]
    assert cfg.devices["cpu"].variant_of("fp16-mixed") == "fp16-mixed"

    monkeypatch.setattr(sensitivity, "brief", _brief)
    fp32, fp16 = fp16_pair
    table = sensitivity.rank_fp16(_MaxAbsJudge(fp32), onnx.load(str(fp32)), onnx.load(str(fp16)), 3, log_=str)
    write_json(tmp_path / "fp16.json", table)
    npz = tmp_path / "calib.npz"
    np.savez(npz, images=np.zeros((2, 3, 8, 8), np.uint8), image_ids=np.arange(2), orig_sizes=np.ones((2, 2)),
             ratios=np.ones(2), pads=np.zeros((2, 2)))
    monkeypatch.setattr(fallback.Judge, "on_fp32", classmethod(lambda cls, src, **k: _MaxAbsJudge(src)))
    monkeypatch.setattr(fallback, "brief", _brief)
    fb = fallback.make_mixed(cfg, "yolo_demo", "fp16-mixed", fp32, tmp_path / "fp16-mixed.onnx",
                             tmp_path / "fp16-mixed.json", npz, tmp_path / "ann.json", tmp_path / "fp16.json",
                             strict_onnx=fp16)["fallback"]
    assert not fb["strict_on_calib"]["passed"] and fb["passed_on_calib"] and fb["stopped_by"] == "gate passed"
    assert [k["node"] for k in fb["kept"]] == ["/sensitive/Sub"] and fb["strict"] == "fp16"
    assert fb["why"].endswith("judged on the fp16 emulation (fp32 arithmetic, fp16 storage) on onnxruntime CPU, "
                              "kiln.fp16_emulation") and "kept in fp32 (ModelOpt AutoCast nodes_to_exclude)" in fb["why"]
    mixed = onnx.load(str(tmp_path / "fp16-mixed.onnx"))  # a real fp16 ONNX, the kept node in fp32
    from kiln import fp16_emulation

    stored = fp16_emulation.fp16_storage(mixed)
    assert "/sensitive/Sub" not in stored and stored
    assert any(n.op_type == "Cast" for n in mixed.graph.node)
