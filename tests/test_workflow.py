"""The workflow end to end on a tiny config: real exports, variants, ONNX Runtime runs and a summary."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kiln.util import read_json
from tests.conftest import REPO, snakemake, tiny_config, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tiny_run):
    """The session's tiny workflow run (tests/conftest.py tiny_run): read here, never changed."""
    return tiny_run


MODELS = ("yolo_demo", "rtdetr_demo")
PRECISIONS = ("fp32", "fp16", "int8")


def test_summary_has_a_row_per_model_device_precision(run):
    work = run
    summary = read_json(work / "results/report/summary.json")
    rows = {(r["model"], r["device"], r["precision"]): r for r in summary["rows"]}
    expected = {(m, dev, p) for m in MODELS for dev in ("cpu", "rtx") for p in PRECISIONS}
    expected |= {(m, "h100", "fp16") for m in MODELS}
    assert set(rows) == expected
    for m in MODELS:
        h100 = rows[(m, "h100", "fp16")]
        assert h100["status"] == "not run"
        assert h100["reason"] == "not run on this host: TensorRT is not installed on this host"
        for p in PRECISIONS:
            rtx = rows[(m, "rtx", p)]
            assert rtx["status"] == "built", rtx
            assert rtx["reason"].startswith("not validated on this host: TensorRT-RTX engines need a CUDA driver")
            assert rtx["engine_bytes"] > 100_000
    cpu_rows = {k: r for k, r in rows.items() if k[1] == "cpu"}
    for key, r in cpu_rows.items():
        assert r["status"] in ("passed", "failed"), (key, r)
        assert r["simplify"].startswith("simplified"), (key, r["simplify"])
        assert r["onnx_bytes"] > 10_000 and r["engine_bytes"] > 10_000
        assert 0.0 <= r["map50"] <= 1.0 and 0.0 <= r["map50_95"] <= r["map50"]
        assert r["latency_median_ms"] > 0 and r["throughput_ips"] > 0
        assert r["latency_p99_ms"] >= r["latency_median_ms"] >= 0
        # End-to-end pipeline latency, and the PyTorch eager baseline on the same CPU.
        assert r["pipeline_median_ms"] > 0 and r["pytorch_latency_median_ms"] > 0 and r["speedup_vs_pytorch"] > 0
    # fp32 through ONNX Runtime's optimizer stays numerically the reference.
    assert rows[("yolo_demo", "cpu", "fp32")]["parity_min_cosine"] > 0.9999
    assert rows[("yolo_demo", "cpu", "fp32")]["map50_drop"] == pytest.approx(0.0, abs=1e-3)
    assert rows[("rtdetr_demo", "cpu", "fp32")]["detection_match_rate"] > 0.99
    # The trained demo detector is good enough that its mAP means something even on 16 images.
    assert rows[("yolo_demo", "cpu", "fp32")]["map50"] >= 0.5
    assert (work / "results/report/summary.csv").read_text().count("\n") == 1 + len(expected)
    assert "| yolo_demo | cpu | int8 |" in (work / "results/report/summary.md").read_text()


def test_artifacts_are_real_variants(run):
    import onnx

    work = run
    base = work / "results/onnx/yolo_demo/opset17"
    int8 = onnx.load(str(base / "int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    fp16 = onnx.load(str(base / "fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # IO kept fp32
    calib = (base / "int8.calib.txt").read_text().split()
    assert len(calib) == 8
    v = read_json(work / "results/validation/cpu/rtdetr_demo/int8/validation.json")
    assert set(v["parity"]["outputs"]) == {"labels", "boxes", "scores"} and "detections" in v["parity"]
    assert [lat["batch_size"] for lat in v["latency"]] == [1]
    assert v["latency"][0]["iterations"] >= 5
    assert [p["batch_size"] for p in v["pipeline"]] == [1]
    assert set(v["pipeline"][0]["phases"]) == {"preprocess", "engine", "postprocess"}
    assert len(v["pictures"]) == 4 and all((work / p).is_file() for p in v["pictures"])
    assert read_json(work / "results/baseline/cpu/rtdetr_demo.json")["status"] == "measured"


def test_rtx_engines_are_plain_plans_with_sidecars(run):
    work = run
    for m in MODELS:
        for p in PRECISIONS:
            folder = work / "results/engines/rtx" / m / p
            record = read_json(folder / "engine.json")
            engine = folder / "model.engine"
            assert record["status"] == "built" and record["engine"].endswith("model.engine")
            assert engine.stat().st_size == record["engine_bytes"]
            from kiln.util import sha256

            assert sha256(engine) == record["engine_sha256"]
            assert record["backend_version"].startswith("1.")
            assert record["onnx"].endswith(f"opset17/{p}.onnx")  # strongly typed: built from the variant
            layers = read_json(folder / "layers.json")
            assert layers["source"] == "network" and len(layers["layers"]) > 10


def test_second_run_has_nothing_to_do(run):
    work = run
    proc = snakemake(work, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- exact rebuilds


def planned_jobs(work: Path, config: dict, *extra: str) -> set[tuple]:
    """(rule, wildcards...) of every job a dry run with `config` plans, `all` excluded."""
    import re

    with tempfile.TemporaryDirectory() as tmp:  # beside, not in, the shared run's folder
        path = write_config(Path(tmp) / "edited.yaml", config)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
               "--configfile", str(path), "--cores", "2", "-n", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs, rule = set(), None
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            if rule in ("summary",):
                jobs.add((rule,))
        elif line.strip().startswith("wildcards:") and rule:
            wc = dict(kv.split("=", 1) for kv in line.strip()[len("wildcards: "):].split(", "))
            jobs.add((rule, *(wc[k] for k in sorted(wc))))
    return jobs


def onnx_chain(model: str, precisions=PRECISIONS) -> set[tuple]:
    """Jobs from export to the variants and reference of one model (wildcards sorted by name)."""
    jobs = {("export", model, "17"), ("simplify", model, "17"), ("surgery", model, "17"), ("reference", model, "17")}
    for p in precisions:
        jobs.add(("quantize" if p in ("int8", "fp8") else "precision", model, "17", p))
    return jobs


def engines(device: str, model: str, precisions=PRECISIONS, validate: bool = True) -> set[tuple]:
    jobs = {("build", device, model, p) for p in precisions}
    if device == "rtx":  # a TensorRT-RTX build is followed by its diagnosis (rules/diagnose.smk)
        jobs |= {("diagnose", device, model, p) for p in precisions}
    if validate:
        jobs |= {("validate", device, model, p) for p in precisions}
    return jobs


def test_editing_one_device_reruns_only_its_jobs(run):
    work = run
    cfg = tiny_config()
    cfg["devices"]["cpu"]["batch_sizes"] = [1, 2]  # latency sweep: validation and the PyTorch baseline only
    expected = {("validate", "cpu", m, p) for m in MODELS for p in PRECISIONS} | {("baseline", "cpu", m) for m in MODELS}
    # The device's serving configs follow its engines and validations (rules/serve.smk).
    assert planned_jobs(work, cfg) == expected | {("serve", "cpu"), ("summary",)}
    cfg = tiny_config()
    cfg["devices"]["rtx"]["builder_optimization_level"] = 2  # builder option: that device's builds
    assert planned_jobs(work, cfg) == {j for m in MODELS for j in engines("rtx", m, validate=False)} | {
        ("serve", "rtx"), ("summary",)}


def test_editing_one_model_reruns_only_its_chain(run):
    work = run
    cfg = tiny_config()
    cfg["models"]["yolo_demo"]["dynamic_hw"] = True
    expected = onnx_chain("yolo_demo") | engines("cpu", "yolo_demo") | engines("rtx", "yolo_demo", validate=False)
    expected.add(("baseline", "cpu", "yolo_demo"))
    assert planned_jobs(work, cfg) == expected | {("serve", "cpu"), ("serve", "rtx"), ("summary",)}


def test_adding_a_precision_adds_only_its_jobs(run):
    work = run
    cfg = tiny_config()
    cfg["devices"]["rtx"]["precisions"].append("bf16")
    expected = {("precision", m, "17", "bf16") for m in MODELS} | {j for m in MODELS for j in engines("rtx", m, ["bf16"], False)}
    assert planned_jobs(work, cfg) == expected | {("serve", "rtx"), ("summary",)}


def test_adding_a_device_adds_only_its_jobs(run):
    work = run
    cfg = tiny_config()
    cfg["devices"]["cpu2"] = dict(cfg["devices"]["cpu"], precisions=["fp32"], threads=1)
    expected = {("build", "cpu2", m, "fp32") for m in MODELS} | {("validate", "cpu2", m, "fp32") for m in MODELS}
    expected |= {("baseline", "cpu2", m) for m in MODELS}
    assert planned_jobs(work, cfg) == expected | {("serve", "cpu2"), ("summary",)}


def test_unchanged_config_plans_nothing(run):
    work = run
    assert planned_jobs(work, tiny_config()) == set()
