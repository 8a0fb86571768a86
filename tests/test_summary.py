"""Summary rows from validation records, and devices this host cannot run."""

from __future__ import annotations

import csv

from kiln import paths, summary
from kiln.cli import main as cli_main
from kiln.config import load
from kiln.util import write_json
from kiln.workflow import buildable, runnable, validation_targets


def _cfg(config_dict, tmp_path):
    config_dict["results"] = str(tmp_path / "results")
    config_dict["devices"] = {"cpu": config_dict["devices"]["cpu"]}
    config_dict["devices"]["gpu"] = {"backend": "onnxruntime", "providers": ["CUDAExecutionProvider"],
                                     "precisions": ["fp16"], "models": ["yolo_demo"]}
    return load(config_dict, check_paths=False)


def _validation(status, reason=None, cosine=0.9999, map50=0.9):
    return {
        "status": status, "reason": reason, "build": {"engine_bytes": 1234},
        "parity": {"outputs": {"output0": {"cosine": cosine, "max_abs": 0.01}}},
        "accuracy": {"map50_95": 0.7, "map50": map50, "map_drop": 0.001, "map50_drop": 0.002},
        "latency": [{"batch_size": 1, "mean_ms": 2.0, "median_ms": 1.9, "p99_ms": 3.0, "cv_percent": 1.0,
                     "throughput_ips": 500.0}],
    }


def test_device_without_its_provider_is_not_run_here(config_dict, tmp_path):
    cfg = _cfg(config_dict, tmp_path)
    reasons = runnable(cfg)
    assert reasons["cpu"] is None
    assert "lacks CUDAExecutionProvider" in reasons["gpu"]
    targets = validation_targets(cfg, reasons, buildable(cfg))
    assert len(targets) == 6 and not any("/gpu/" in t for t in targets)


def test_rows_carry_status_numbers_and_reasons(config_dict, tmp_path):
    cfg = _cfg(config_dict, tmp_path)
    for dev, model, prec in cfg.jobs():
        if dev == "cpu":
            v = _validation("failed", "map50 drop 0.0600 > 0.05") if prec == "int8" else _validation("passed")
            write_json(paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=model, precision=prec), v)
    out = tmp_path / "results" / "report"
    table = summary.write_summary(cfg, out / "s.json", out / "s.csv", out / "s.md",
                                  cannot_build={"gpu": "ONNX Runtime here lacks CUDAExecutionProvider"},
                                  cannot_run={"gpu": "ONNX Runtime here lacks CUDAExecutionProvider"})
    assert len(table) == 7
    by = {(r["device"], r["model"], r["precision"]): r for r in table}
    assert by[("cpu", "yolo_demo", "fp32")]["status"] == "passed"
    assert by[("cpu", "yolo_demo", "fp32")]["latency_median_ms"] == 1.9
    assert by[("cpu", "yolo_demo", "int8")]["reason"] == "map50 drop 0.0600 > 0.05"
    gpu = by[("gpu", "yolo_demo", "fp16")]
    assert gpu["status"] == "not run" and gpu["reason"].startswith("not run on this host: ONNX Runtime here lacks")
    assert gpu["map50"] is None
    md = (out / "s.md").read_text()
    assert "4 of 7 rows passed." in md
    rows = list(csv.DictReader((out / "s.csv").open()))
    assert len(rows) == 7 and rows[0]["latency_median_ms"] == "1.9000"


def test_failed_build_is_reported_with_reason(config_dict, tmp_path):
    cfg = _cfg(config_dict, tmp_path)
    for dev, model, prec in cfg.jobs():
        if dev == "cpu":
            v = {"status": "failed", "reason": "build failed: ONNX Runtime could not load", "build": {}}
            write_json(paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=model, precision=prec), v)
    rows = summary.rows(cfg, {"gpu": "no GPU"}, {"gpu": "no GPU"})
    assert rows[0]["status"] == "failed" and rows[0]["reason"].startswith("build failed")


def test_kiln_check_lists_jobs_and_refuses_bad_config(workdir, capsys, config_dict):
    import yaml

    tmp_path = workdir  # holds the demo checkpoints: `kiln check` reads them (weights-only)
    config_dict["devices"] = {"cpu": config_dict["devices"]["cpu"]}
    config_dict["devices"]["cpu"]["precisions"] = ["fp32"]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config_dict))
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli_main(["check", str(good)]) == 0
        assert "2 jobs" in capsys.readouterr().out
        config_dict["devices"]["cpu"]["opset"] = 99
        good.write_text(yaml.safe_dump(config_dict))
        assert cli_main(["check", str(good)]) == 1
        assert "'devices.cpu.opset': 99 is greater than the maximum of 20" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


def test_unstable_latency_is_flagged_in_every_format(config_dict, tmp_path):
    """The warning validation recorded (CV above validation.latency.cv_warn_percent) reaches the json, csv and
    md rows, word for word as the page's measurement notes say it; the status stays passed."""
    cfg = _cfg(config_dict, tmp_path)
    warning = ("coefficient of variation 9.5% exceeds 2.5%: the host was busy or clocks varied; "
               "latency numbers may be unstable")
    for dev, model, prec in cfg.jobs():
        if dev == "cpu":
            v = _validation("passed")
            if (model, prec) == ("yolo_demo", "fp16"):
                v["latency"][0].update(cv_percent=9.5, warning=warning)
            write_json(paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=model, precision=prec), v)
    out = tmp_path / "results" / "report"
    table = summary.write_summary(cfg, out / "s.json", out / "s.csv", out / "s.md", {"gpu": "no GPU"}, {"gpu": "no GPU"})
    # Every validation here has the same latency: fp16 is also flagged as not faster than fp32 (kiln.findings).
    flag = (f"latency unstable at batch 1: {warning}; fp16 is not faster than fp32 on cpu "
            f"(1.90 ms against 1.90 ms median at batch 1)")
    by = {(r["model"], r["device"], r["precision"]): r for r in table}
    assert by[("yolo_demo", "cpu", "fp16")]["status"] == "passed" and by[("yolo_demo", "cpu", "fp16")]["flags"] == flag
    assert by[("yolo_demo", "cpu", "fp32")]["flags"] is None
    import json

    assert [r["flags"] for r in json.loads((out / "s.json").read_text())["rows"]].count(flag) == 1
    rows = list(csv.DictReader((out / "s.csv").open()))
    assert [r["flags"] for r in rows if (r["model"], r["device"], r["precision"]) == ("yolo_demo", "cpu", "fp16")] == [flag]
    md = (out / "s.md").read_text()
    assert f"| yolo_demo | cpu | fp16 | passed | {flag} |" in md
    assert "6 of 7 rows passed.\n1 of them with unstable latency (flags)." in md


def test_not_measurable_rows_and_the_weakest_parity_part(config_dict, tmp_path):
    """A random-weight reference's row is neither passed nor failed; every row names its weakest part."""
    from kiln.report.page import STATUS_NOTE

    cfg = _cfg(config_dict, tmp_path)
    why = ("reference mAP50-95 0.0012 is below validation.min_reference_map 0.05: with random weights nothing "
           "can be compared")
    for dev, model, prec in cfg.jobs():
        if dev == "cpu":
            v = _validation("not measurable", why) if model == "rtdetr_demo" else _validation("passed")
            v["parity"]["weakest"] = {"part": "scores", "metric": "cosine", "value": 0.9699, "min": 0.98}
            v["parity"]["detections"] = {"reference_detections": 40, "match_rate": 0.95, "mean_box_iou": 0.91}
            write_json(paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=model, precision=prec), v)
    out = tmp_path / "results" / "report"
    table = summary.write_summary(cfg, out / "s.json", out / "s.csv", out / "s.md",
                                  cannot_build={"gpu": "no CUDA"}, cannot_run={"gpu": "no CUDA"})
    by = {(r["device"], r["model"], r["precision"]): r for r in table}
    r = by[("cpu", "rtdetr_demo", "int8")]
    assert r["status"] == "not measurable" and r["reason"] == why
    assert r["parity_weakest"] == "scores 0.9699" and r["detection_box_iou"] == 0.91
    md = (out / "s.md").read_text()
    assert "3 of 7 rows passed." in md and "3 rows are not measurable" in md and "| scores 0.9699 |" in md
    assert "not measurable" in STATUS_NOTE
