"""Throughput at N concurrent streams (kiln/streams.py, kiln/validate/streams.py, Runner.streams): the host
path for real on an ONNX Runtime CPU session, the device path's round-robin bookkeeping on stand-in events and
a stand-in TensorRT engine, the best-count rule, config errors, the summary columns and the page figure."""

from __future__ import annotations

import copy
import importlib.util
import time
import types
from pathlib import Path

import numpy as np
import pytest

from kiln import latency, paths, summary
from kiln import streams as harness
from kiln.backends.base import Runner
from kiln.config import load
from kiln.errors import KilnError
from kiln.util import read_json, write_json
from kiln.validate import GPU_TIMING
from kiln.validate import streams as vstreams
from tests.conftest import REPO, tiny_config

L = {"warmup_ms": 5, "min_iterations": 5, "min_seconds": 0.05}


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 32, 32])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], np.linspace(-1, 1, 216, dtype=np.float32))
    node = helper.make_node("Conv", ["images", "w"], ["out"], pads=[1, 1, 1, 1])
    model = helper.make_model(helper.make_graph([node], "tiny", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _device(max_streams=8, profiles=()):
    return types.SimpleNamespace(name="dev", max_streams=max_streams, profiles=profiles)


DYNAMIC = types.SimpleNamespace(dynamic_batch=True)


# ---------------------------------------------------------------- the rule and the counts


@pytest.mark.parametrize("ips, best", [
    ({1: 100.0, 2: 190.0, 4: 200.0, 8: 205.0}, 4),  # 2 is 7% below the top, 4 within 5%
    ({1: 100.0, 2: 99.0, 4: 60.0}, 1),  # more streams only slower
    ({1: 100.0, 2: 196.0, 4: 200.0}, 2),  # 2 is 2% below: fewer streams win
    ({4: 50.0}, 4),
])
def test_best_is_the_fewest_streams_within_five_percent_of_the_top(ips, best):
    assert harness.best(ips) == best
    assert "fewest streams" in harness.BEST_RULE and "5%" in harness.BEST_RULE


def test_counts_above_max_streams_are_dropped_with_the_reason():
    kept, dropped = vstreams.counts([8, 1, 4, 2], 4, "cpu")
    assert kept == [1, 2, 4]
    assert dropped == [{"streams": 8, "reason": "above devices.cpu.max_streams (4)"}]


def test_batch_one_where_admitted_else_the_smallest():
    runner = types.SimpleNamespace(max_batch=lambda: None)
    assert vstreams.batch(DYNAMIC, _device(), runner)[0] == 1
    prof = ({"images": {"min": [4, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [8, 3, 8, 8]}},)
    assert vstreams.batch(DYNAMIC, _device(profiles=prof), runner) == (
        4, "the smallest batch devices.dev.profiles admit")
    static = types.SimpleNamespace(dynamic_batch=False)
    assert vstreams.batch(static, _device(), types.SimpleNamespace(max_batch=lambda: 1))[0] == 1


# ---------------------------------------------------------------- host path, for real


def test_cpu_streams_on_one_onnxruntime_session(tmp_path):
    from kiln.backends.onnxruntime import OrtRunner

    runner = OrtRunner(_tiny_onnx(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"], threads=1)
    others = runner.streams(3)
    assert others[0] is runner and all(o.session is runner.session for o in others)
    for o in others[1:]:
        o.close()
    assert runner.session is not None  # closing a stream leaves the session open

    feeds = lambda b: {"images": np.ones((b, 3, 32, 32), np.float32)}  # noqa: E731
    rec = vstreams.measure(runner, DYNAMIC, _device(max_streams=2), feeds, [1, 2, 4], L, GPU_TIMING)
    assert rec["batch_size"] == 1 and rec["batch_reason"] == "one camera frame per query"
    assert [r["streams"] for r in rec["results"]] == [1, 2]
    assert rec["dropped"] == [{"streams": 4, "reason": "above devices.dev.max_streams (2)"}]
    for r in rec["results"]:
        assert r["images_per_s"] > 0 and len(r["per_stream"]) == r["streams"]
        assert r["images"] == sum(s["iterations"] for s in r["per_stream"])
        for s in r["per_stream"]:
            assert s["iterations"] >= L["min_iterations"] and 0 < s["p50_ms"] <= s["p99_ms"]
            assert s["images_per_s"] > 0
        assert r["p50_ms"] <= r["p99_ms"]
    assert rec["images_per_s"] == {str(r["streams"]): r["images_per_s"] for r in rec["results"]}
    assert rec["best"] == harness.best({r["streams"]: r["images_per_s"] for r in rec["results"]})
    two = rec["results"][1]["memory"]
    assert two["method"].startswith("VmRSS of /proc/self/status") and two["after_bytes"] > 0
    # The streams share one session's arena: the reading may not grow, and then no size is claimed.
    if two["after_bytes"] > two["before_bytes"]:
        assert two["per_context_bytes"] > 0 and rec["context_memory"] == two
    else:
        assert two["per_context_bytes"] is None and "no growth measured" in two["method"]
    runner.close()


def test_memory_that_does_not_grow_is_not_a_size():
    """A reading that fell or stayed (shared arena, noise) gives no per-context size, never a negative one."""
    from types import SimpleNamespace

    readings = iter([(1000, "fake reading")])
    runner = SimpleNamespace(context_memory=lambda: {"bytes": None}, memory_in_use=lambda: next(readings))
    got = vstreams._memory(runner, 3, (1100, "fake reading"))
    assert got["per_context_bytes"] is None
    assert got["method"] == "fake reading, after minus before the 3 more stream(s)' first run, over 3: " \
                            "no growth measured (-100 bytes)"
    readings = iter([(1400, "fake reading")])
    assert vstreams._memory(runner, 3, (1100, "fake reading"))["per_context_bytes"] == 100


def test_host_streams_run_together():
    """Steps that wait 5 ms (releasing the GIL, as ONNX Runtime's run does): 4 threads give ~4x the images/s."""
    def step():
        time.sleep(0.005)

    one = harness.measure_host([step], 1, warmup_ms=5, min_iterations=5, min_seconds=0.1)
    four = harness.measure_host([step] * 4, 1, warmup_ms=5, min_iterations=5, min_seconds=0.1)
    assert four.streams == 4 and all(s.iterations >= 5 for s in four.per_stream)
    assert four.images_per_s > 2.5 * one.images_per_s
    assert four.seconds >= 0.1


def test_a_failing_stream_raises_on_the_caller():
    def bad():
        raise RuntimeError("engine exploded")

    with pytest.raises(RuntimeError, match="engine exploded"):
        harness.measure_host([lambda: None, bad], 1, warmup_ms=1, min_iterations=2, min_seconds=0.01)


class OneStreamRunner(Runner):
    """A plugin's runner: infer alone, the contract's defaults for the rest."""

    def infer(self, feeds):
        return {"out": feeds["images"] * 2}


def test_a_runner_without_streams_is_timed_at_one_and_says_why():
    r = OneStreamRunner()
    assert r.streams(1) == [r] and r.context_memory() == {"bytes": None, "method": None}
    assert r.memory_in_use() is None
    feeds = lambda b: {"images": np.ones((b, 2), np.float32)}  # noqa: E731
    rec = vstreams.measure(r, DYNAMIC, _device(), feeds, [1, 2, 4], L, GPU_TIMING)
    assert [x["streams"] for x in rec["results"]] == [1] and rec["best"] == 1
    assert [d["streams"] for d in rec["dropped"]] == [2, 4]
    assert "does not run concurrent streams (Runner.streams)" in rec["dropped"][0]["reason"]


# ---------------------------------------------------------------- device path, stand-in events


class LogEvents:
    """A stream's CUDA events on a shared fake clock; every record is logged with its stream."""

    name = "fake events"

    def __init__(self, stream: int, log: list, clock: list):
        self.stream, self.log, self.clock = stream, log, clock

    def create(self):
        return {"t": None, "stream": self.stream}

    def record(self, ev):
        assert ev["stream"] == self.stream  # an event of this stream's timer, never another's
        self.clock[0] += 1
        ev["t"] = self.clock[0]
        self.log.append(("record", self.stream))

    def query(self, ev):
        return ev["t"] is not None

    def synchronize(self, ev):
        pass

    def elapsed_ms(self, a, b):
        return float(b["t"] - a["t"])


def test_device_streams_round_robin_each_with_its_own_timer():
    log, clock = [], [0]
    n, depth = 3, 2
    timers = [latency.CudaEventTimer(LogEvents(i, log, clock)) for i in range(n)]
    inflight = [0] * n
    most = [0] * n
    orig_finish = latency.CudaEventTimer.finish

    steps = []
    for i in range(n):
        def step(i=i):
            log.append(("step", i))
            inflight[i] += 1
            most[i] = max(most[i], inflight[i])
        steps.append(step)

    for i, t in enumerate(timers):
        def finish(q, i=i, t=t):
            inflight[i] -= 1
            return orig_finish(t, q)
        t.finish = finish

    stats = harness.measure_device(steps, timers, 1, warmup_ms=1, min_iterations=4, min_seconds=0.01, depth=depth)
    order = [i for kind, i in log if kind == "step"]
    assert order == [k % n for k in range(len(order))]  # queries alternate across the streams
    assert stats.streams == n and all(s.iterations >= 4 for s in stats.per_stream)
    assert len({s.iterations for s in stats.per_stream}) == 1  # whole rounds
    assert most == [depth] * n  # depth queries in flight per stream, never more
    assert all(c == 0 for c in inflight)  # every query finished
    # Each query is two records (start, end) on its own stream: latency 1 fake ms.
    assert stats.p50_ms == stats.p99_ms == 1.0
    assert stats.depth == depth and "round-robin" in stats.timer
    with pytest.raises(ValueError, match="one timer per stream"):
        harness.measure_device(steps, timers[:2], 1)


def _fake_trt_runner():
    from kiln.backends.trt.runner import TrtEngineRunner
    from tests.test_validate import FakeCudart, FakeEngine, FakeTrt

    class Cudart(FakeCudart):
        def __init__(self):
            super().__init__()
            self.next_stream, self.records = 100, []

        def cudaStreamCreateWithFlags(self, flags):
            self.next_stream += 1
            return 0, self.next_stream

        def cudaEventRecord(self, ev, stream):
            self.records.append(stream)
            return super().cudaEventRecord(ev, stream)

        def cudaMemGetInfo(self):
            return 0, 1 << 30, 4 << 30

    class Engine(FakeEngine):
        device_memory_size_v2 = 123_456

    cudart = Cudart()
    return TrtEngineRunner.from_engine(FakeTrt, Engine(cudart), cudart), cudart


def test_tensorrt_streams_are_contexts_on_their_own_cuda_streams():
    from tests.test_validate import _feeds

    runner, cudart = _fake_trt_runner()
    rs = runner.streams(3)
    assert rs[0] is runner and len({id(r.context) for r in rs}) == 3 and len({r.stream for r in rs}) == 3
    assert all(r.engine is runner.engine for r in rs)
    assert runner.context_memory() == {"bytes": 123_456, "method": "ICudaEngine.device_memory_size_v2"}
    for r in rs[1:]:
        r.close()
    assert runner.stream is not None and runner.rt is not None  # the owner stays open

    rec = vstreams.measure(runner, DYNAMIC, _device(), _feeds, [1, 3], L, GPU_TIMING)
    assert [r["streams"] for r in rec["results"]] == [1, 3] and rec["batch_size"] == 1
    three = rec["results"][1]
    assert three["memory"] == {"per_context_bytes": 123_456, "method": "ICudaEngine.device_memory_size_v2"}
    assert three["depth"] == GPU_TIMING["depth"] and len(three["per_stream"]) == 3
    assert "round-robin" in rec["method"]
    # Each query's five records (start, h2d, compute, d2h, end) on its own stream, the queries going round them.
    cudart.records.clear()
    vstreams.measure(runner, DYNAMIC, _device(), _feeds, [3], L, GPU_TIMING)
    per_query = [cudart.records[k:k + 5] for k in range(0, len(cudart.records), 5)]
    assert all(len(set(q)) == 1 for q in per_query) and len(per_query) >= 3 * L["min_iterations"]
    order = [q[0] for q in per_query]
    assert len(set(order[:3])) == 3 and all(order[k] == order[k % 3] for k in range(len(order)))
    assert runner.stream in order
    runner.close()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("value, message", [
    (4, "config: 'validation.streams' is 4: write a list of stream counts, e.g. [1, 2, 4, 8]"),
    ([], "config: 'validation.streams' is an empty list: list at least one stream count"),
    ([1, 0], "config: 'validation.streams[1]' is 0: stream counts are whole numbers of 1 or more"),
    ([-2], "config: 'validation.streams[0]' is -2: stream counts are whole numbers of 1 or more"),
    ([1, "2"], "config: 'validation.streams[1]' is '2': stream counts are whole numbers of 1 or more"),
    ([2, 2], "config: 'validation.streams' lists 2 twice: list each count once"),
])
def test_streams_config_errors(value, message):
    cfg = copy.deepcopy(tiny_config())
    cfg["validation"]["streams"] = value
    with pytest.raises(KilnError) as err:
        load(cfg, check_paths=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0, -1, True, "4"])
def test_max_streams_config_error(value):
    cfg = copy.deepcopy(tiny_config())
    cfg["devices"]["cpu"]["max_streams"] = value
    with pytest.raises(KilnError, match=r"^config: 'devices.cpu.max_streams' is .*: use a whole number of 1 or more"):
        load(cfg, check_paths=False)


def test_streams_defaults_and_the_demo_config():
    cfg = load(copy.deepcopy(tiny_config()), check_paths=False)
    assert cfg.validation["streams"] == [1, 2, 4, 8] and cfg.devices["cpu"].max_streams == 8
    demo = load(__import__("yaml").safe_load((REPO / "config.yaml").read_text()), base=REPO, check_paths=False)
    assert demo.devices["cpu"].max_streams == 4


# ---------------------------------------------------------------- summary and page


def _with_streams(results: Path) -> dict:
    """Add a streams record, as validation writes it, to the crafted tree's cpu yolo_demo fp32 validation."""
    p = paths.fmt(paths.VALIDATION, results=str(results), device="cpu", model="yolo_demo", precision="fp32")
    v = read_json(p)
    ips = {1: 50.0, 2: 96.0, 4: 99.0}
    res = [{"streams": n, "batch_size": 1, "images_per_s": x, "p50_ms": 20.0 * n, "p99_ms": 30.0 * n,
            "per_stream": [{"stream": i, "iterations": 50, "p50_ms": 20.0 * n, "p99_ms": 30.0 * n,
                            "images_per_s": x / n} for i in range(n)], "memory": {}} for n, x in ips.items()]
    v["streams"] = {"batch_size": 1, "results": res, "images_per_s": {str(k): x for k, x in ips.items()},
                    "best": harness.best(ips), "best_rule": harness.BEST_RULE}
    write_json(p, v)
    return v["streams"]


def test_summary_columns_and_page_figure(tmp_path):
    from kiln.report.page import write_page
    from tests.report_tree import H100_REASON, RTX_REASON, make_results

    results = make_results(tmp_path)
    rec = _with_streams(results)
    assert rec["best"] == 2  # 96 is within 5% of 99
    config = tiny_config()
    config["results"] = str(results)
    config["devices"]["cpu"]["batch_sizes"] = [1, 4]
    cfg = load(config, check_paths=False)
    R = str(results)
    out = [Path(paths.fmt(f, results=R)) for f in (paths.SUMMARY_JSON, paths.SUMMARY_CSV, paths.SUMMARY_MD)]
    summary.write_summary(cfg, *out, cannot_build={"h100": H100_REASON},
                          cannot_run={"h100": H100_REASON, "rtx": RTX_REASON})
    rows = {(r["model"], r["device"], r["precision"]): r for r in read_json(out[0])["rows"]}
    row = rows[("yolo_demo", "cpu", "fp32")]
    assert row["best_streams"] == 2 and row["streams_images_per_s"] == 96.0 and row["streams_p99_ms"] == 60.0
    assert row["images_per_s_by_streams"] == {"1": 50.0, "2": 96.0, "4": 99.0}
    assert rows[("yolo_demo", "cpu", "fp16")]["best_streams"] is None
    assert "1: 50.0000, 2: 96.0000, 4: 99.0000" in out[1].read_text()
    md = out[2].read_text()
    assert "best_streams" in md and "1: 50.0000, 2: 96.0000, 4: 99.0000" in md

    html, page_md = results / "report/kiln.html", results / "report/kiln.md"
    write_page(results, html, page_md)
    fig = Path(paths.fmt(paths.DEVICE_PLOT, results=R, model="yolo_demo", device="cpu", plot="streams"))
    from PIL import Image

    with Image.open(fig) as im:
        assert im.format == "PNG" and im.width >= 400
    text = html.read_text()
    assert "Throughput vs concurrent streams" in text and "best streams" in text
    # No validation of rtdetr_demo timed streams: no figure for it.
    assert not Path(paths.fmt(paths.DEVICE_PLOT, results=R, model="rtdetr_demo", device="cpu", plot="streams")).exists()


# ---------------------------------------------------------------- bench/latency_gpu.py, its pure parts


def _bench():
    spec = importlib.util.spec_from_file_location("bench_latency_gpu", REPO / "bench" / "latency_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_streams_sweep_on_stand_in_contexts():
    bench = _bench()
    assert bench.parse_counts("4,1,2") == [1, 2, 4]
    for bad in ("0,1", "a", "", "2,2"):
        with pytest.raises(SystemExit, match="give distinct stream counts of 1 or more"):
            bench.parse_counts(bad)
    log, clock, allocated = [], [0], [1000]

    def make_context(i):
        allocated[0] += 256  # buffers and graph of this context
        events = LogEvents(i, log, clock)
        return bench.StreamContext(lambda i=i: log.append(("step", i)), events)

    out = bench.streams_sweep([1, 2, 3], make_context, lambda: allocated[0], seconds=0.01, warmup_ms=1,
                              min_iterations=3)
    assert [r["streams"] for r in out["results"]] == [1, 2, 3]
    assert all(r["memory_per_context_bytes"] == 256 for r in out["results"])
    assert out["best"] == harness.best({r["streams"]: r["images_per_s"] for r in out["results"]})
    assert set(out["images_per_s"]) == {"1", "2", "3"}
    report = bench.streams_report({"workload": "w", "gpu": {"name": "G"}, **out})
    assert "| 3 |" in report and "best:" in report


def test_bench_streams_mode_says_in_one_line_that_it_needs_cuda():
    import subprocess
    import sys

    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has CUDA")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "latency_gpu.py"), "--streams", "1,2"],
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO),
                                                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "streams mode needs" in proc.stderr
