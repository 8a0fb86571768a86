"""A run killed in the middle of a job, and two runs at once in one folder.

One small workflow (yolo_demo on the CPU in fp32 and int8, and an int8 TensorRT-RTX build) is taken
through, once for the whole module, starting from the ONNX stages of the session's random-weight yolo run
(tests/conftest.py random_yolo_run) up to the fp32 variant:

1. a run is started; while its `quantize` job runs (the run's process group held with SIGSTOP), a
   second run in the same folder is started and must be refused by Snakemake's lock; then the first
   run's process group gets SIGTERM;
2. a second run is started and its process group gets SIGKILL during the TensorRT-RTX `build`: a
   killed Snakemake cannot remove its lock, so the next run is refused until `--unlock`;
3. a last run must complete, redo exactly the killed jobs' outputs, and leave only complete
   artifacts: every ONNX loads and passes onnx.checker, every JSON parses, the summary has all rows.

The runs use the repository's workflow profile (profiles/default: rerun-incomplete).
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.util import read_json, sha256
from tests.conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.integration

QUANTIZE_LOG = "results/logs/quantize/yolo_demo_opset17_int8.log"
BUILD_LOG = "results/logs/build/rtx_yolo_demo_int8.log"
INT8 = "results/onnx/yolo_demo/opset17/int8.onnx"
CALIB_LIST = "results/onnx/yolo_demo/opset17/int8.calib.txt"
RTX_RECORD = "results/engines/rtx/yolo_demo/int8/engine.json"
RTX_ENGINE = "results/engines/rtx/yolo_demo/int8/model.engine"
ROWS = {("yolo_demo", "cpu", "fp32"), ("yolo_demo", "cpu", "int8"), ("yolo_demo", "rtx", "int8")}


def small_config() -> dict:
    cfg = tiny_config()
    del cfg["models"]["rtdetr_demo"]
    cfg["devices"] = {
        "cpu": dict(cfg["devices"]["cpu"], precisions=["fp32", "int8"]),
        "rtx": dict(cfg["devices"]["rtx"], precisions=["int8"]),
    }
    return cfg


def command(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "config.yaml"), "--cores", "2", *extra]


def start(work: Path, name: str) -> subprocess.Popen:
    """Snakemake in its own process group (so the group can be signalled), output to a file."""
    out = open(work / f"{name}.out", "w")  # noqa: SIM115 (closed by finish())
    return subprocess.Popen(command(work), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def output(work: Path, name: str) -> str:
    return (work / f"{name}.out").read_text()


def wait_until(proc: subprocess.Popen, happened, timeout: float, what: str) -> None:
    """Wait until `happened()`; fail (killing the run) if the run ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if happened():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def wait_for_text(proc: subprocess.Popen, path: Path, text: str, timeout: float, what: str) -> None:
    wait_until(proc, lambda: path.is_file() and text in path.read_text(errors="replace"), timeout, what)


def wait_for_temporary(proc: subprocess.Popen, dst: Path, timeout: float, what: str) -> None:
    """Until an atomic write of `dst` has made its temporary (.NAME.XXXXXXXX...)."""
    wait_until(proc, lambda: bool(list(dst.parent.glob(f".{dst.name}.*"))), timeout, what)


def kill_group(proc: subprocess.Popen, sig: signal.Signals, timeout: float = 120) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"Snakemake did not exit within {timeout:.0f} s of {sig.name}")


def leftovers(results: Path) -> list[str]:
    """Temporaries left beside the outputs: atomic writes' files (.NAME.XXXX.tmp), tools' scratch folders
    (.NAME.XXXX.scratch)."""
    return sorted(str(p.relative_to(results)) for pattern in (".*.tmp", ".*.tmp.*", ".*.scratch")
                  for p in results.rglob(pattern))


def upstream_of(run: Path, work: Path) -> None:
    """The ONNX stages of `run` (conftest random_yolo_run: the same random yolo weights, dataset and opset) up to
    the fp32 variant and the reference, with Snakemake's records of them, copied into `work`: the runs below
    start at the quantize job. Nothing downstream is copied, logs neither (the waits below read them)."""
    onnx = "results/onnx/yolo_demo/opset17"
    for folder in ("models", "results/data", "results/inputs", "results/reference", ".snakemake/metadata"):
        shutil.copytree(run / folder, work / folder)
    (work / onnx).mkdir(parents=True)
    for name in ("export.onnx", "simplified.onnx", "simplify.json", "surgery.onnx", "surgery.json", "fp32.onnx",
                 "fp32.json"):
        shutil.copy2(run / onnx / name, work / onnx / name)


@pytest.fixture(scope="module")
def story(random_yolo_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("interrupt")
    upstream_of(random_yolo_run, work)
    write_config(work / "config.yaml", small_config())
    seen: dict = {}

    # 1. SIGTERM during quantize, with a second run attempted meanwhile. The first run's process
    #    group is stopped (SIGSTOP) while the second one tries, so the first cannot finish the job or
    #    the run in between, however long the second one takes.
    first = start(work, "first")
    wait_for_text(first, work / QUANTIZE_LOG, "making int8 variant", 600, "the quantize job started")
    os.killpg(first.pid, signal.SIGSTOP)
    seen["calib_list_during_quantize"] = (work / CALIB_LIST).is_file()
    seen["concurrent"] = subprocess.run(command(work), capture_output=True, text=True, timeout=300)
    seen["first_still_running"] = first.poll() is None
    os.killpg(first.pid, signal.SIGTERM)  # delivered when the group continues
    seen["first_status"] = kill_group(first, signal.SIGCONT)
    seen["after_term"] = {p: (work / p).exists() for p in (INT8, CALIB_LIST)}
    seen["leftovers_after_term"] = leftovers(work / "results")
    locks = work / ".snakemake/locks"
    seen["locks_after_term"] = sorted(os.listdir(locks)) if locks.is_dir() else []

    # 2. SIGKILL during the TensorRT-RTX build.
    second = start(work, "second")
    wait_for_text(second, work / BUILD_LOG, "build rtx/yolo_demo/int8 with", 900, "the rtx build started")
    wait_for_temporary(second, work / RTX_ENGINE, 60, "the engine's temporary was made")
    seen["second_status"] = kill_group(second, signal.SIGKILL)
    seen["after_kill"] = {p: (work / p).exists() for p in (RTX_RECORD, RTX_ENGINE)}
    seen["leftovers_after_kill"] = leftovers(work / "results")
    seen["int8_sha_before_kill_rerun"] = sha256(work / INT8)
    seen["stale_lock_run"] = subprocess.run(command(work), capture_output=True, text=True, timeout=300)
    seen["unlock"] = subprocess.run(command(work, "--unlock"), capture_output=True, text=True, timeout=300)

    # 3. The run that finishes the work.
    seen["final"] = subprocess.run(command(work), capture_output=True, text=True, timeout=900)
    seen["noop"] = subprocess.run(command(work, "-n"), capture_output=True, text=True, timeout=300)
    seen["leftovers"] = leftovers(work / "results")
    return work, seen


def test_second_run_in_the_same_folder_is_refused_by_the_lock(story):
    work, seen = story
    proc = seen["concurrent"]
    assert seen["first_still_running"], "the first run ended before the second was tried"
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Error: Directory cannot be locked." in text, text[-3000:]
    assert "It can be removed with the --unlock argument." in text
    assert str(work) in text  # names the folder
    # It refused before doing anything: the first run's quantize output is not touched by it.
    assert "Select jobs to execute" not in text


def test_sigterm_during_quantize_leaves_no_accepted_half_output(story):
    work, seen = story
    assert seen["first_status"] != 0
    # The calibration list is written last, after the ONNX it belongs to: mid-job it is not there to look finished.
    assert not seen["calib_list_during_quantize"]
    # Snakemake removed the killed job's outputs, and released its lock.
    assert seen["after_term"] == {INT8: False, CALIB_LIST: False}, seen["after_term"]
    assert seen["locks_after_term"] == []


def test_sigkill_during_build_needs_unlock_then_resumes(story):
    work, seen = story
    assert seen["second_status"] == -signal.SIGKILL
    # The engine is written under a temporary name and renamed: a killed build leaves no engine file.
    assert seen["after_kill"] == {RTX_RECORD: False, RTX_ENGINE: False}
    stale = seen["stale_lock_run"]
    assert stale.returncode != 0 and "Error: Directory cannot be locked." in stale.stdout + stale.stderr
    assert seen["unlock"].returncode == 0, seen["unlock"].stderr[-2000:]


def test_last_run_completes_and_redoes_only_the_killed_jobs(story):
    work, seen = story
    final = seen["final"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-6000:]
    text = final.stdout + final.stderr
    # The quantize job finished in the second run; the killed build is redone, quantize is not.
    assert "localrule build:" in text or "rule build:" in text
    assert "rule quantize:" not in text
    assert sha256(work / INT8) == seen["int8_sha_before_kill_rerun"]
    assert "Nothing to be done" in seen["noop"].stdout + seen["noop"].stderr


def test_every_artifact_is_complete(story):
    import onnx

    work, seen = story
    results = work / "results"
    onnx_files = sorted(results.glob("onnx/*/*/*.onnx"))
    assert [p.name for p in onnx_files] == ["export.onnx", "fp32.onnx", "int8.onnx", "simplified.onnx", "surgery.onnx"]
    # ONNX Runtime's engines are optimized ONNX models too.
    onnx_files += [work / read_json(p)["engine"] for p in sorted(results.glob("engines/cpu/*/*/engine.json"))]
    assert len(onnx_files) == 5 + 2
    for path in onnx_files:
        onnx.checker.check_model(onnx.load(str(path)))
    for path in results.rglob("*.json"):
        json.loads(path.read_text())
    assert len((results / "onnx/yolo_demo/opset17/int8.calib.txt").read_text().split()) == 8
    record = read_json(results / RTX_RECORD.removeprefix("results/"))
    assert record["status"] == "built"
    assert (work / RTX_ENGINE).stat().st_size == record["engine_bytes"]
    assert sha256(work / RTX_ENGINE) == record["engine_sha256"]
    rows = read_json(results / "report/summary.json")["rows"]
    assert {(r["model"], r["device"], r["precision"]) for r in rows} == ROWS
    assert len(rows) == len(ROWS)
    for r in rows:
        # Random weights: the cpu rows are validated, and honestly "not measurable" (nothing to compare).
        assert r["status"] == ("built" if r["device"] == "rtx" else "not measurable"), r
        assert r["device"] == "rtx" or "validation.min_reference_map" in r["reason"] or "no detections" in r["reason"]
    assert (results / "report/summary.csv").read_text().count("\n") == 1 + len(ROWS)


def test_killed_jobs_temporaries_are_cleared_by_their_rerun(story):
    """What a killed job leaves beside its outputs (a job cannot clean up after SIGKILL, nor after SIGTERM, which
    ends a Python script without its `finally`) is removed when the same step runs again."""
    work, seen = story
    # The build was killed while TensorRT-RTX wrote the engine's temporary: it stayed, under a hidden name.
    engine_tmp = [n for n in seen["leftovers_after_kill"] if n.startswith("engines/rtx/yolo_demo/int8/.model.engine.")]
    assert engine_tmp and engine_tmp[0].endswith(".engine.tmp"), seen["leftovers_after_kill"]
    for name in seen["leftovers_after_term"] + seen["leftovers_after_kill"]:
        assert Path(name).name.startswith("."), name  # never a finished-looking name
    # The reruns of those steps removed them (and their own temporaries are gone once renamed).
    assert seen["leftovers"] == [], seen["leftovers"]
