"""Artifacts checked against their records: a changed engine, ONNX or reference is never shown as passed.

The unit tests craft records and files; the workflow story runs one small workflow (yolo_demo on the CPU in
fp32; it starts from a copy of the session's tiny run, so only the jobs that config changes run first) and
then damages it as a user or a failing disk would:

1. the engine truncated with its mtime put back (os.utime): Snakemake sees no change, the summary reruns
   (its params carry the check) and shows the row as stale, with the fix; the next run has nothing to do;
2. the engine's mtime moved on as well: validate reruns and stops with one line, no traceback, and so does
   every run after it until the fix;
3. the fix the message names (--forcerun engine.json): the engine is rebuilt and the row passes again;
4. the validation removed (as Snakemake removes a failed job's outputs): the next run makes it again;
5. the reference outputs truncated with their mtime put back: the rows that used them are stale.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln import integrity, paths, summary
from kiln.config import load
from kiln.errors import KilnError
from kiln.util import read_json, sha256, write_json
from tests.conftest import copy_run, snakemake, tiny_config

ENGINE = "results/engines/cpu/yolo_demo/fp32/model.engine"
RECORD = "results/engines/cpu/yolo_demo/fp32/engine.json"
VALIDATION = "results/validation/cpu/yolo_demo/fp32/validation.json"
VALIDATE_LOG = "results/logs/validate/cpu_yolo_demo_fp32.log"
OUTPUTS = "results/reference/yolo_demo/opset17/outputs.npz"
REFERENCE = "results/reference/yolo_demo/opset17/reference.json"


def truncate(path: Path, keep_mtime: bool) -> int:
    """Cut a file to half its size, its mtime put back if asked; returns the new size."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.truncate(st.st_size // 2)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return st.st_size // 2


# --------------------------------------------------------------------------- the check itself


def test_a_rewrite_keeping_size_and_mtime_is_found_and_an_untouched_file_is_not_read(tmp_path, monkeypatch):
    f = tmp_path / "model.engine"
    f.write_bytes(b"engine bytes" * 100)
    digest, size, stamp = sha256(f), f.stat().st_size, integrity.stamp(f)
    assert integrity.differs(f, digest, size, stamp) is None

    def no_hashing(path):
        raise AssertionError("an unchanged file was hashed")

    monkeypatch.setattr(integrity, "sha256", no_hashing)
    assert integrity.differs(f, digest, size, stamp) is None  # the stamp says unchanged: not read
    monkeypatch.undo()
    st = f.stat()
    f.write_bytes(b"ENGINE BYTES" * 100)  # same size, other bytes, old mtime back: only the ctime moved
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    why = integrity.differs(f, digest, size, stamp)
    assert why == f"its sha256 is {sha256(f)[:12]}..., the record says {digest[:12]}..."
    assert integrity.differs(f, digest, size + 1, stamp) == f"it is {size} bytes, the record says {size + 1}"


def test_engine_problem_names_the_file_the_record_and_the_fix(tmp_path):
    engine, record = tmp_path / "model.engine", tmp_path / "engine.json"
    engine.write_bytes(b"x" * 10)
    rec = {"status": "built", "engine_sha256": sha256(engine), "engine_bytes": 10}
    assert integrity.engine_problem(rec, record, engine) is None
    engine.write_bytes(b"x" * 4)
    with pytest.raises(KilnError) as err:
        integrity.check(integrity.engine_problem(rec, record, engine, full=True, target=RECORD))
    assert str(err.value) == (f"{engine} does not match its record {record} (it is 4 bytes, the record says 10): it "
                              f"changed after it was built. Run Snakemake again with --forcerun {RECORD} to rebuild it")
    assert integrity.engine_problem({"status": "failed"}, record, engine) is None  # a failed build has no engine


# --------------------------------------------------------------------------- summary rows from crafted records


@pytest.fixture
def crafted(config_dict, tmp_path):
    """cpu/yolo_demo/fp32 as a run leaves it: the ONNX it was built from, the engine, their record, the
    reference and its record, and a validation of exactly those."""
    config_dict["results"] = str(tmp_path / "results")
    config_dict["devices"] = {"cpu": dict(config_dict["devices"]["cpu"], precisions=["fp32"], models=["yolo_demo"])}
    cfg = load(config_dict, check_paths=False)
    R = cfg.results
    key = {"results": R, "device": "cpu", "model": "yolo_demo", "precision": "fp32"}
    f = {"onnx": Path(paths.fmt(paths.VARIANT, results=R, model="yolo_demo", opset=17, precision="fp32")),
         "engine": Path(paths.fmt(paths.ENGINE_FILE, **key)), "record": Path(paths.fmt(paths.ENGINE_RECORD, **key)),
         "outputs": Path(paths.fmt(paths.REFERENCE, results=R, model="yolo_demo", opset=17)),
         "reference": Path(paths.fmt(paths.REFERENCE_RECORD, results=R, model="yolo_demo", opset=17)),
         "validation": Path(paths.fmt(paths.VALIDATION, **key))}
    for name, data in (("onnx", b"onnx" * 50), ("engine", b"plan" * 80), ("outputs", b"npz" * 30)):
        f[name].parent.mkdir(parents=True, exist_ok=True)
        f[name].write_bytes(data)
    write_json(f["record"], {"status": "built", "onnx": str(f["onnx"]), "onnx_sha256": sha256(f["onnx"]),
                             "onnx_bytes": 200, "onnx_stamp": integrity.stamp(f["onnx"]),
                             "engine_sha256": sha256(f["engine"]), "engine_bytes": 320,
                             "engine_stamp": integrity.stamp(f["engine"])})
    write_json(f["reference"], {"outputs_sha256": sha256(f["outputs"]), "outputs_bytes": 90,
                                "outputs_stamp": integrity.stamp(f["outputs"]), "accuracy": {}})
    lat = {"batch_size": 1, "mean_ms": 2.0, "median_ms": 1.9, "p99_ms": 3.0, "cv_percent": 1.0, "throughput_ips": 500.0}
    write_json(f["validation"], {
        "status": "passed", "reason": None, "build": {"engine_bytes": 320},
        "validated": {"engine_sha256": sha256(f["engine"]), "reference_sha256": sha256(f["outputs"])},
        "parity": {"outputs": {"output0": {"cosine": 0.9999, "max_abs": 0.01}}},
        "accuracy": {"map50_95": 0.7, "map50": 0.9, "map_drop": 0.001, "map50_drop": 0.002}, "latency": [lat]})
    return cfg, f


def _row(cfg) -> dict:
    return summary._row(cfg, "cpu", "yolo_demo", "fp32", None, None)


def test_matching_records_pass(crafted):
    cfg, _ = crafted
    row = _row(cfg)
    assert row["status"] == "passed" and row["engine_bytes"] == 320 and row["flags"] is None
    assert summary.damaged(cfg, {"cpu": None}, {"cpu": None}) == {}


def test_engine_rewritten_with_its_mtime_kept_is_stale(crafted):
    cfg, f = crafted
    st = f["engine"].stat()
    f["engine"].write_bytes(b"PLAN" * 80)
    os.utime(f["engine"], ns=(st.st_atime_ns, st.st_mtime_ns))
    row = _row(cfg)
    assert row["status"] == "stale" and row["map50"] is None and row["engine_bytes"] is None
    assert row["reason"].startswith(f"{f['engine']} does not match its record {f['record']} (its sha256 is ")
    assert row["reason"].endswith(f"Run Snakemake again with --forcerun {f['record']} to rebuild it")
    # What the summary rule's params carry, so that Snakemake reruns the summary.
    assert summary.damaged(cfg, {"cpu": None}, {"cpu": None}) == {"cpu/yolo_demo/fp32": row["reason"]}


def test_onnx_changed_after_the_build_is_stale(crafted):
    cfg, f = crafted
    st = f["onnx"].stat()
    f["onnx"].write_bytes(b"ONNX" * 50)
    os.utime(f["onnx"], ns=(st.st_atime_ns, st.st_mtime_ns))
    row = _row(cfg)
    assert row["status"] == "stale"
    assert row["reason"].startswith(f"{f['onnx']} is not the ONNX that {f['record']} was built from (its sha256 is ")
    assert row["reason"].endswith(f"--forcerun {f['record']} to rebuild the engine from it")
    # A newer ONNX is Snakemake's to act on (it rebuilds the engine): not a param change before the run.
    os.utime(f["onnx"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
    assert summary.damaged(cfg, {"cpu": None}, {"cpu": None}) == {}


def test_reference_outputs_changed_is_stale(crafted):
    cfg, f = crafted
    truncate(f["outputs"], keep_mtime=True)
    row = _row(cfg)
    assert row["status"] == "stale"
    assert row["reason"] == (f"{f['outputs']} does not match its record {f['reference']} (it is 45 bytes, the record "
                             f"says 90): it changed after it was made. Run Snakemake again with --forcerun "
                             f"{f['reference']} to make the reference again (and validate its engines again)")


def test_validation_of_another_engine_or_none_is_not_shown(crafted):
    cfg, f = crafted
    v = read_json(f["validation"])
    v["validated"]["engine_sha256"] = "0" * 64
    write_json(f["validation"], v)
    row = _row(cfg)
    assert row["status"] == "stale" and row["map50"] is None
    assert row["reason"] == (f"{f['validation']} validated another engine (sha256 000000000000...) than {f['record']} "
                             f"records ({sha256(f['engine'])[:12]}...). Run Snakemake again with --forcerun "
                             f"{f['validation']} to validate it again")
    del v["validated"]
    write_json(f["validation"], v)
    assert "does not record which engine it validated (an older Kiln wrote it)" in _row(cfg)["reason"]
    f["validation"].unlink()
    row = _row(cfg)
    assert row["status"] == "missing"
    assert row["reason"] == f"{f['validation']} does not exist: run the workflow again to validate this engine"


def test_validate_refuses_a_damaged_engine_before_loading_it(crafted):
    from kiln.validate import validate

    cfg, f = crafted
    truncate(f["engine"], keep_mtime=True)
    with pytest.raises(KilnError, match=r"model.engine does not match its record .*engine.json \(it is 160 bytes, "
                                        r"the record says 320\).* --forcerun \S+/results/engines/cpu/yolo_demo/fp32/"
                                        r"engine.json to rebuild it$"):
        validate(cfg, "cpu", "yolo_demo", "fp32", f["record"], f["outputs"], f["reference"], f["outputs"],
                 f["outputs"], f["validation"], engine_file=f["engine"])


# --------------------------------------------------------------------------- the workflow story

def _config() -> dict:
    cfg = tiny_config()
    del cfg["models"]["rtdetr_demo"]
    cfg["devices"] = {"cpu": dict(cfg["devices"]["cpu"], precisions=["fp32"])}
    return cfg


def _row_of(work: Path) -> dict:
    rows = read_json(work / "results/report/summary.json")["rows"]
    assert len(rows) == 1
    return rows[0]


def _text(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def story(tiny_run, tmp_path_factory):
    # The session's run has made every job of this config but the summary, page and serve ones: a private
    # copy (files, mtimes and Snakemake's records), since everything below damages it.
    work = copy_run(tiny_run, tmp_path_factory.mktemp("integrity") / "work", _config())
    seen: dict = {"first": snakemake(work)}
    seen["row_first"] = _row_of(work)
    seen["size"] = (work / ENGINE).stat().st_size

    # 1. Truncated, mtime kept.
    seen["cut"] = truncate(work / ENGINE, keep_mtime=True)
    seen["kept"] = snakemake(work)
    seen["row_kept"] = _row_of(work)
    seen["md_kept"] = (work / "results/report/summary.md").read_text()
    seen["csv_kept"] = (work / "results/report/summary.csv").read_text()
    seen["page_kept"] = (work / "results/report/kiln.md").read_text()
    seen["noop_kept"] = snakemake(work, "-n")

    # 2. The mtime moves on too: validate reruns.
    os.utime(work / ENGINE)
    seen["newer"] = snakemake(work)
    seen["log_newer"] = (work / VALIDATE_LOG).read_text()
    seen["validation_after_newer"] = (work / VALIDATION).exists()
    seen["md_newer"] = (work / "results/report/summary.md").read_text()
    seen["again"] = snakemake(work)

    # 3. The fix the message names.
    seen["fixed"] = snakemake(work, "--forcerun", RECORD)
    seen["row_fixed"] = _row_of(work)
    seen["noop_fixed"] = snakemake(work, "-n")

    # 4. A validation removed (as Snakemake removes a failed job's outputs): made again, not "Nothing to be done".
    (work / VALIDATION).unlink()
    seen["removed"] = snakemake(work)
    seen["row_removed"] = _row_of(work)

    # 5. The reference outputs truncated, mtime kept.
    seen["ref_cut"] = truncate(work / OUTPUTS, keep_mtime=True)
    seen["ref_size"] = read_json(work / REFERENCE)["outputs_bytes"]
    seen["ref_kept"] = snakemake(work)
    seen["row_ref"] = _row_of(work)
    return work, seen


ENGINE_MESSAGE = ("{engine} does not match its record {record} (it is {cut} bytes, the record says {size}): it changed "
                  "after it was built. Run Snakemake again with --forcerun {record} to rebuild it")


@pytest.mark.integration
def test_first_run_passes(story):
    _, seen = story
    assert seen["first"].returncode == 0, _text(seen["first"])[-5000:]
    assert seen["row_first"]["status"] == "passed", seen["row_first"]


@pytest.mark.integration
def test_engine_truncated_with_mtime_kept_shows_stale_not_passed(story):
    _, seen = story
    assert seen["kept"].returncode == 0, _text(seen["kept"])[-5000:]
    message = ENGINE_MESSAGE.format(engine=ENGINE, record=RECORD, cut=seen["cut"], size=seen["size"])
    row = seen["row_kept"]
    assert row["status"] == "stale" and row["reason"] == message
    assert row["engine_bytes"] is None and row["map50"] is None  # not the old engine's numbers
    assert "| yolo_demo | cpu | fp32 | stale |" in seen["md_kept"] and "| passed |" not in seen["md_kept"]
    assert "0 of 1 rows passed." in seen["md_kept"]
    assert ",stale," in seen["csv_kept"] and message in seen["csv_kept"]
    assert "| cpu | fp32 | stale |" in seen["page_kept"]
    text = _text(seen["kept"])
    assert "rule validate:" not in text and "rule build:" not in text  # only the summary and the page reran
    assert "Nothing to be done" in _text(seen["noop_kept"])  # and it stays stale, without reruns


@pytest.mark.integration
def test_engine_truncated_with_new_mtime_fails_validate_in_one_line(story):
    _, seen = story
    message = ENGINE_MESSAGE.format(engine=ENGINE, record=RECORD, cut=seen["cut"], size=seen["size"])
    for run in ("newer", "again"):  # and every run after it, until the fix: never "Nothing to be done"
        proc = seen[run]
        assert proc.returncode != 0
        text = _text(proc)
        assert f"kiln: {message}" in text, text[-5000:]
        assert "Error in rule validate:" in text
        assert "Traceback" not in text and "Nothing to be done" not in text
    assert seen["log_newer"].strip().endswith(f"ERROR: {message}")
    assert "Traceback" not in seen["log_newer"]
    assert not seen["validation_after_newer"]  # Snakemake removed the failed job's output
    assert "| passed |" not in seen["md_newer"] and "| stale |" in seen["md_newer"]


@pytest.mark.integration
def test_forcerun_named_in_the_message_rebuilds_and_revalidates(story):
    work, seen = story
    proc = seen["fixed"]
    assert proc.returncode == 0, _text(proc)[-5000:]
    text = _text(proc)
    assert "rule build:" in text and "rule validate:" in text
    assert seen["row_fixed"]["status"] == "passed" and seen["row_fixed"]["engine_bytes"] == seen["size"]
    assert "Nothing to be done" in _text(seen["noop_fixed"])


@pytest.mark.integration
def test_removed_validation_is_made_again(story):
    work, seen = story
    proc = seen["removed"]
    assert proc.returncode == 0, _text(proc)[-5000:]
    assert "rule validate:" in _text(proc) and "rule build:" not in _text(proc)
    assert (work / VALIDATION).is_file() and seen["row_removed"]["status"] == "passed"


@pytest.mark.integration
def test_reference_truncated_with_mtime_kept_is_stale(story):
    _, seen = story
    assert seen["ref_kept"].returncode == 0, _text(seen["ref_kept"])[-5000:]
    row = seen["row_ref"]
    assert row["status"] == "stale"
    assert row["reason"] == (f"{OUTPUTS} does not match its record {REFERENCE} (it is {seen['ref_cut']} bytes, the "
                             f"record says {seen['ref_size']}): it changed after it was made. Run Snakemake again "
                             f"with --forcerun {REFERENCE} to make the reference again (and validate its engines "
                             f"again)")
