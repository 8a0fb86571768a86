"""`kiln compare OLD NEW` on crafted summaries: regressions against tolerances, added/removed rows, exit codes."""

from __future__ import annotations

import copy

import pytest

from kiln import compare
from kiln.cli import main as cli_main
from kiln.util import write_json


def _row(model="yolo_demo", device="cpu", precision="fp32", status="passed", reason=None, map50_95=0.60,
         p50=10.0, ips=100.0, batch=1) -> dict:
    validated = status in ("passed", "failed") and map50_95 is not None
    return {"model": model, "device": device, "precision": precision, "backend": "onnxruntime", "status": status,
            "reason": reason, "map50_95": map50_95 if validated else None, "batch_size": batch if validated else None,
            "latency_median_ms": p50 if validated else None, "throughput_ips": ips if validated else None}


BASE = [
    _row(precision="fp32"),
    _row(precision="fp16", map50_95=0.599, p50=6.0, ips=160.0),
    _row(precision="int8", map50_95=0.58, p50=4.0, ips=250.0),
    _row(device="rtx", precision="fp16", status="built", reason="not validated on this host: no CUDA driver"),
    _row(device="h100", precision="fp16", status="not run", reason="not run on this host: TensorRT is not installed"),
]


def _write(path, rows):
    write_json(path, {"rows": rows, "columns": list(rows[0])})
    return path


def _by(changes):
    return {c.key: c for c in changes}


def _key(precision, device="cpu", model="yolo_demo"):
    return (model, device, precision)


def test_identical_runs_have_no_regression():
    rows = {(r["model"], r["device"], r["precision"]): r for r in BASE}
    changes = compare.compare(rows, copy.deepcopy(rows))
    assert len(changes) == len(BASE)
    assert not any(c.regressions or c.notes for c in changes)


@pytest.mark.parametrize(
    ("edit", "regression"),
    [
        ({"map50_95": 0.585}, "mAP50-95 dropped 0.0150 (> 0.01)"),
        ({"latency_median_ms": 11.5}, "p50 latency +15.0% (> 10%)"),
        ({"throughput_ips": 85.0}, "throughput -15.0% (> 10% drop)"),
        ({"status": "failed", "reason": "map50 drop 0.0700 > 0.05"},
         "status passed -> failed (map50 drop 0.0700 > 0.05)"),
    ],
)
def test_each_kind_of_regression_is_flagged(edit, regression):
    old = {_key("fp32"): _row()}
    new = {_key("fp32"): {**_row(), **edit}}
    (c,) = compare.compare(old, new)
    assert c.regressions == [regression]


def test_changes_within_tolerance_are_not_regressions():
    old = {_key("fp32"): _row()}
    new = {_key("fp32"): _row(map50_95=0.591, p50=10.9, ips=91.0)}  # -0.009, +9%, -9%
    (c,) = compare.compare(old, new)
    assert c.regressions == []
    # Tighter tolerances flag the same numbers.
    (c,) = compare.compare(old, new, compare.Tolerances(map_drop=0.005, latency_increase=5, throughput_drop=5))
    assert len(c.regressions) == 3
    # Getting better is never a regression.
    (c,) = compare.compare(old, {_key("fp32"): _row(map50_95=0.7, p50=5.0, ips=200.0)})
    assert c.regressions == []


def test_latency_at_a_different_batch_size_is_not_compared():
    old = {_key("fp32"): _row()}
    new = {_key("fp32"): _row(p50=40.0, ips=200.0, batch=8)}
    (c,) = compare.compare(old, new)
    assert c.regressions == []
    assert c.notes == ["batch size 1 -> 8: latency not compared"]


def test_added_removed_and_non_failing_status_changes_are_listed_not_flagged():
    old = {(r["model"], r["device"], r["precision"]): r for r in BASE}
    new = copy.deepcopy(old)
    del new[_key("int8")]
    new[_key("bf16")] = _row(precision="bf16")
    new[_key("fp16", "rtx")] = _row(device="rtx", precision="fp16")  # built -> passed: validated now
    new[_key("fp16", "h100")]["status"] = "built"
    changes = _by(compare.compare(old, new))
    assert changes[_key("int8")].kind == "removed" and changes[_key("int8")].notes == ["removed (was passed)"]
    assert changes[_key("bf16")].kind == "added" and changes[_key("bf16")].notes == ["added (passed)"]
    assert changes[_key("fp16", "rtx")].notes == ["status built -> passed"]
    assert changes[_key("fp16", "h100")].notes[0].startswith("status not run -> built")
    assert not any(c.regressions for c in changes.values())
    assert list(changes)[-1] == _key("int8")  # removed rows come last


def test_a_build_that_starts_failing_is_a_regression():
    old = {_key("fp16", "rtx"): BASE[3]}
    new = {_key("fp16", "rtx"): {**BASE[3], "status": "failed", "reason": "build failed: no implementation"}}
    (c,) = compare.compare(old, new)
    assert c.regressions == ["status built -> failed (build failed: no implementation)"]


def test_cli_exit_codes_and_table(tmp_path, capsys):
    old = _write(tmp_path / "old.json", BASE)
    assert cli_main(["compare", str(old), str(old)]) == 0
    out = capsys.readouterr().out
    assert "0 regressions in 5 rows (0 added, 0 removed)" in out
    assert out.splitlines()[0].split() == ["model", "device", "precision", "status", "mAP50-95", "p50", "ms",
                                           "images/s", "verdict"]

    rows = copy.deepcopy(BASE)
    rows[1]["latency_median_ms"] = 7.2  # fp16 +20%
    rows[2].update(status="failed", reason="output output0 cosine 0.98 < 0.99")
    new = _write(tmp_path / "new.json", rows)
    assert cli_main(["compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    fp16 = next(line for line in out.splitlines() if line.startswith("yolo_demo") and " fp16 " in line and " cpu " in line)
    assert "6.00 -> 7.20 (+20.0%)" in fp16 and "REGRESSION: p50 latency +20.0% (> 10%)" in fp16
    assert "passed -> failed" in out and "2 regressions in 5 rows" in out
    # A looser tolerance lets the latency through; the failed row still regresses.
    assert cli_main(["compare", str(old), str(new), "--latency-increase", "25"]) == 1
    assert "1 regression in 5 rows" in capsys.readouterr().out

    assert cli_main(["compare", str(old), str(new), "--markdown"]) == 1
    md = capsys.readouterr().out
    assert md.startswith("| model | device | precision | status |") and "|---|" in md


def test_cli_takes_results_folders(tmp_path, capsys):
    for run in ("a", "b"):
        (tmp_path / run / "report").mkdir(parents=True)
        _write(tmp_path / run / "report/summary.json", BASE)
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_cli_unreadable_summaries_are_one_line_errors(tmp_path, capsys):
    good = _write(tmp_path / "good.json", BASE)
    assert cli_main(["compare", str(tmp_path / "missing.json"), str(good)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: ") and "missing.json: no summary there" in err and "Traceback" not in err
    (tmp_path / "bad.json").write_text('{"columns": []}')
    assert cli_main(["compare", str(good), str(tmp_path / "bad.json")]) == 2
    assert "bad.json is not a Kiln summary.json" in capsys.readouterr().err
    assert cli_main(["compare", str(good), str(good), "--map-drop", "-1"]) == 2
    assert "tolerances cannot be negative" in capsys.readouterr().err


def test_runs_with_and_without_mixed_variants_compare_row_by_row(tmp_path, capsys):
    """One run without int8-mixed, one with it (and its kept nodes); then a run whose int8-mixed keeps more."""
    mixed = {**_row(precision="int8-mixed", map50_95=0.595, p50=4.4, ips=230.0),
             "kept": "1 kept in higher precision: /head/cls.0.2/Conv (the 1 region adding the most error ...)",
             "latency_given_up": 0.1}
    old = [*BASE[:2], _row(precision="int8", status="failed", reason="map50 drop 0.11 > 0.05", map50_95=0.50)]
    new = [*old, mixed]
    changes = _by(compare.compare(compare.load_rows(_write(tmp_path / "old.json", old)),
                                  compare.load_rows(_write(tmp_path / "new.json", new))))
    assert changes[_key("int8-mixed")].kind == "added" and changes[_key("int8-mixed")].notes == ["added (passed)"]
    assert not any(c.regressions for c in changes.values())
    more = {**mixed, "kept": "2 kept in higher precision: /head/cls.0.2/Conv, /head/cls.1.2/Conv (why)"}
    changes = _by(compare.compare({_key("int8-mixed"): mixed}, {_key("int8-mixed"): more}))
    assert changes[_key("int8-mixed")].notes == [
        "kept nodes changed: 1 kept in higher precision: /head/cls.0.2/Conv -> 2 kept in higher precision: /head/cls.0.2/Conv, "
        "/head/cls.1.2/Conv"]
    # Removed again: listed, not flagged; the CLI reads both and exits 0.
    _write(tmp_path / "newer.json", old)
    assert cli_main(["compare", str(tmp_path / "new.json"), str(tmp_path / "newer.json")]) == 0
    assert "removed (was passed)" in capsys.readouterr().out
