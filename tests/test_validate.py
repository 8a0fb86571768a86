"""Parity metrics, the latency harness and the pass/fail gates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kiln import latency, parity
from kiln.errors import KilnError
from kiln.validate import gate


def test_dense_parity_identical_and_perturbed():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 7, 50)).astype(np.float32)
    same = parity.dense(ref, ref.copy())
    assert same["max_abs"] == 0 and same["cosine"] == pytest.approx(1.0)
    noisy = parity.dense(ref, ref + np.float32(0.01))
    assert noisy["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert 0.99 < noisy["cosine"] < 1.0
    flipped = parity.dense(ref, -ref)
    assert flipped["cosine"] == pytest.approx(-1.0)
    assert parity.dense(ref, ref[:1])["error"] == "shape mismatch"


def test_dense_parity_counts_exact_matches_of_integer_outputs():
    ref = np.array([[1, 2, 3, 4]], dtype=np.int64)
    assert parity.dense(ref, np.array([[1, 2, 0, 4]]))["exact_match"] == 0.75


def _dets(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64)}


def test_detection_parity_ignores_order_but_not_labels_or_position():
    ref = [_dets([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 1])]
    reordered = [_dets([[20, 20, 40, 41], [0, 0, 10, 10]], [0.79, 0.9], [1, 0])]
    r = parity.detections(ref, reordered, min_score=0.3)
    assert r["match_rate"] == 1.0 and r["box_max_abs"] == pytest.approx(1.0) and r["score_max_abs"] == pytest.approx(0.01)
    wrong_label = [_dets([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 2])]
    assert parity.detections(ref, wrong_label, min_score=0.3)["match_rate"] == 0.5
    moved = [_dets([[5, 5, 15, 15], [20, 20, 40, 40]], [0.9, 0.8], [0, 1])]
    assert parity.detections(ref, moved, min_score=0.3)["match_rate"] == 0.5
    # Low-score reference detections are not required.
    low = [_dets([[0, 0, 10, 10]], [0.1], [0])]
    assert parity.detections(low, [_dets([], [], [])], min_score=0.3)["reference_detections"] == 0


def test_latency_summary_statistics():
    stats = latency.summarize([0.001, 0.002, 0.003, 0.004], batch_size=2, wall_s=0.01, timer="t")
    assert stats.min_ms == pytest.approx(1) and stats.max_ms == pytest.approx(4)
    assert stats.mean_ms == pytest.approx(2.5) and stats.median_ms == pytest.approx(2)
    assert stats.p99_ms == pytest.approx(4)
    assert stats.throughput_ips == pytest.approx(2 * 4 / 0.01)
    assert stats.cv_percent == pytest.approx(100 * np.std([1, 2, 3, 4]) / 2.5)
    assert stats.warning and "coefficient of variation" in stats.warning
    steady = latency.summarize([0.002] * 10, 1, 0.02, "t")
    assert steady.cv_percent == 0 and steady.warning is None


def test_latency_measure_honours_minimum_iterations_and_time():
    """A fake clock advancing 1 ms per step: the harness must run the warm-up, then both minimums."""
    now = itertools.count()
    ticks = {"t": 0.0}

    def clock():
        return ticks["t"]

    def step():
        next(now)
        ticks["t"] += 0.001

    class FakeTimer:
        name = "fake"

        def __call__(self, fn):
            t0 = clock()
            fn()
            return clock() - t0

    stats = latency.measure(step, batch_size=1, warmup_ms=10, min_iterations=5, min_seconds=0.05,
                            timer=FakeTimer(), clock=clock)
    assert stats.iterations == 50  # 50 ms at 1 ms per step beats the 5-iteration minimum
    assert stats.mean_ms == pytest.approx(1.0)
    stats = latency.measure(step, batch_size=1, warmup_ms=0, min_iterations=80, min_seconds=0.01,
                            timer=FakeTimer(), clock=clock)
    assert stats.iterations == 80


def test_latency_measure_times_real_work():
    stats = latency.measure(lambda: sum(range(20000)), batch_size=1, warmup_ms=5, min_iterations=10, min_seconds=0.02)
    assert stats.iterations >= 10 and stats.min_ms > 0 and stats.min_ms <= stats.median_ms <= stats.max_ms


THRESH = {"cosine_min": 0.99, "match_rate_min": 0.9, "map50_drop_max": 0.01, "map_drop_max": 0.02}


def test_gate_passes_and_fails_with_reasons():
    ok = {"parity": {"outputs": {"output0": {"cosine": 0.999}}}, "accuracy": {"map50_drop": 0.0, "map_drop": 0.01}}
    assert gate("yolo", THRESH, ok) == []
    bad = {"parity": {"outputs": {"output0": {"cosine": 0.9}}}, "accuracy": {"map50_drop": 0.05, "map_drop": 0.0}}
    reasons = gate("yolo", THRESH, bad)
    assert len(reasons) == 2 and "cosine 0.90000 < 0.99" in reasons[0] and "map50 drop 0.0500 > 0.01" in reasons[1]
    det = {"parity": {"outputs": {}, "detections": {"reference_detections": 4, "match_rate": 0.5}},
           "accuracy": {"map50_drop": 0, "map_drop": 0}}
    assert gate("rtdetr", THRESH, det) == ["detection match rate 0.500 < 0.9"]


# --------------------------------------------------------------------------------------------------
# The harness: timers with phases, queries in flight


class FakeEvents:
    """CUDA events on a fake GPU timeline: `t` (ms) is where the stream has got to when an event is recorded."""

    name = "fake"

    def __init__(self, polls_until_done: int = 3):
        self.t = 0.0
        self.created = 0
        self.polls = 0
        self.syncs = 0
        self.polls_until_done = polls_until_done

    def create(self):
        self.created += 1
        return {"t": None, "polls": 0}

    def record(self, ev):
        ev["t"] = self.t
        ev["polls"] = 0

    def query(self, ev):
        self.polls += 1
        ev["polls"] += 1
        return ev["polls"] >= self.polls_until_done

    def synchronize(self, ev):
        self.syncs += 1

    def elapsed_ms(self, a, b):
        return b["t"] - a["t"]


def test_cuda_event_timer_phases_from_marks_and_spin_wait():
    ev = FakeEvents()
    timer = latency.CudaEventTimer(ev, spin_wait=True)

    def step():  # a query as the GPU runners enqueue it: H2D, engine, D2H, marked after each
        ev.t += 0.5
        timer.mark("h2d")
        ev.t += 2.0
        timer.mark("compute")
        ev.t += 0.25
        timer.mark("d2h")

    sample = timer(step)
    assert sample["latency"] == pytest.approx(2.75e-3)
    assert sample["h2d"] == pytest.approx(0.5e-3) and sample["compute"] == pytest.approx(2e-3)
    assert sample["d2h"] == pytest.approx(0.25e-3)
    assert sample["enqueue"] >= 0
    assert ev.polls == 3 and ev.syncs == 0  # busy-polled the end event until it completed
    blocking = latency.CudaEventTimer(ev, spin_wait=False)
    blocking(step)
    assert ev.syncs == 1
    # Marks outside a timed step are ignored; events are recycled, not created per query.
    timer.mark("stray")
    for _ in range(20):
        timer(step)
    # One set per timer: start, end and three marks for `timer`; `blocking` only made start and end,
    # since the step marks on `timer`, which ignores marks outside its own queries.
    assert ev.created == 5 + 2


def test_measure_keeps_queries_in_flight_and_summarizes_phases():
    ev = FakeEvents(polls_until_done=1)
    order = []

    class Recording(latency.CudaEventTimer):
        def start(self, step):
            order.append("start")
            return super().start(step)

        def finish(self, q):
            order.append("finish")
            return super().finish(q)

    timer = Recording(ev)
    ticks = {"t": 0.0}

    def step():
        ticks["t"] += 0.001  # host time advances 1 ms per enqueue
        ev.t += 1.0
        timer.mark("compute")

    stats = latency.measure(step, batch_size=4, warmup_ms=0, min_iterations=10, min_seconds=0,
                            timer=timer, clock=lambda: ticks["t"], depth=2)
    assert order[:3] == ["start", "start", "finish"]  # the second query is enqueued before the first is waited for
    assert order.count("start") == order.count("finish") == 10
    assert stats.iterations == 10 and stats.depth == 2
    assert stats.median_ms == pytest.approx(1.0) and stats.phases["compute"]["median_ms"] == pytest.approx(1.0)
    assert set(stats.phases) == {"compute", "enqueue"}
    assert stats.throughput_qps == pytest.approx(10 / 0.01) and stats.throughput_ips == pytest.approx(40 / 0.01)
    assert stats.timer.startswith("CUDA events (fake)")


def test_host_timer_marks_split_a_query_into_phases():
    ticks = {"t": 0.0}
    timer = latency.HostTimer(clock=lambda: ticks["t"])

    def step():
        ticks["t"] += 0.002
        timer.mark("preprocess")
        ticks["t"] += 0.005
        timer.mark("engine")
        ticks["t"] += 0.001
        timer.mark("postprocess")

    sample = timer(step)
    assert sample == pytest.approx({"latency": 0.008, "preprocess": 0.002, "engine": 0.005, "postprocess": 0.001})
    assert latency.HostTimer(clock=lambda: ticks["t"])(lambda: ticks.update(t=ticks["t"] + 0.003)) == pytest.approx(0.003)


def test_summary_warns_on_unstable_gpu_compute():
    samples = [{"latency": 0.010, "compute": c} for c in (0.001, 0.009, 0.001, 0.009)]
    stats = latency.summarize(samples, 1, 0.04, "t", cv_warn=2.5)
    assert stats.cv_percent == 0 and "GPU compute time is unstable" in stats.warning
    assert stats.phases["compute"]["min_ms"] == pytest.approx(1) and stats.phases["compute"]["max_ms"] == pytest.approx(9)


def test_batch_sweep_spans_the_profile():
    assert latency.batch_sweep([1, 8], 8) == [1, 2, 4, 8]
    assert latency.batch_sweep([1, 8], 12) == [1, 2, 4, 8, 12]
    assert latency.batch_sweep([3, 32], 16) == [1, 2, 3, 4, 8, 16]  # 32 is beyond the engine's profile
    assert latency.batch_sweep([1, 8]) == [1, 8]


# --------------------------------------------------------------------------------------------------
# trtexec: command and output


# Written for these tests in the format NVIDIA documents for trtexec's output (TensorRT 10's
# "Inference Options" and "Performance summary"), not captured from a run.
TRTEXEC_OUTPUT = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v101300] [b35] # trtexec --loadEngine=model.engine --shapes=images:1x3x256x256 --warmUp=200 --iterations=50 --duration=2 --useSpinWait --useCudaGraph
[11/20/2025-10:00:00] [I] === Model Options ===
[11/20/2025-10:00:00] [I] Format: *
[11/20/2025-10:00:00] [I] === Inference Options ===
[11/20/2025-10:00:00] [I] Batch: Explicit
[11/20/2025-10:00:00] [I] Input inference shape : images=1x3x256x256
[11/20/2025-10:00:00] [I] Iterations: 50
[11/20/2025-10:00:00] [I] Duration: 2s (+ 200ms warm up)
[11/20/2025-10:00:00] [I] Sleep time: 0ms
[11/20/2025-10:00:00] [I] Idle time: 0ms
[11/20/2025-10:00:00] [I] Inference Streams: 1
[11/20/2025-10:00:00] [I] ExposeDMA: Disabled
[11/20/2025-10:00:00] [I] Data transfers: Enabled
[11/20/2025-10:00:00] [I] Spin-wait: Enabled
[11/20/2025-10:00:00] [I] Multithreading: Disabled
[11/20/2025-10:00:00] [I] CUDA Graph: Enabled
[11/20/2025-10:00:00] [I] Separate profiling: Disabled
[11/20/2025-10:00:03] [I] === Performance summary ===
[11/20/2025-10:00:03] [I] Throughput: 1220.53 qps
[11/20/2025-10:00:03] [I] Latency: min = 0.8313 ms, max = 1.13623 ms, mean = 0.856512 ms, median = 0.853271 ms, percentile(90%) = 0.866455 ms, percentile(95%) = 0.872559 ms, percentile(99%) = 0.93689 ms
[11/20/2025-10:00:03] [I] Enqueue Time: min = 0.0224609 ms, max = 0.0418579 ms, mean = 0.0281011 ms, median = 0.0278564 ms, percentile(90%) = 0.029248 ms, percentile(95%) = 0.0299805 ms, percentile(99%) = 0.0343994 ms
[11/20/2025-10:00:03] [I] H2D Latency: min = 0.0292969 ms, max = 0.0450439 ms, mean = 0.0319302 ms, median = 0.0314941 ms, percentile(90%) = 0.0327148 ms, percentile(95%) = 0.0335693 ms, percentile(99%) = 0.0375977 ms
[11/20/2025-10:00:03] [I] GPU Compute Time: min = 0.79541 ms, max = 1.09131 ms, mean = 0.819012 ms, median = 0.815918 ms, percentile(90%) = 0.828369 ms, percentile(95%) = 0.834473 ms, percentile(99%) = 0.897217 ms
[11/20/2025-10:00:03] [I] D2H Latency: min = 0.00463867 ms, max = 0.0146484 ms, mean = 0.00557128 ms, median = 0.00549316 ms, percentile(90%) = 0.00585938 ms, percentile(95%) = 0.00610352 ms, percentile(99%) = 0.0078125 ms
[11/20/2025-10:00:03] [I] Total Host Walltime: 2.00196 s
[11/20/2025-10:00:03] [I] Total GPU Compute Time: 1.99924 s
[11/20/2025-10:00:03] [W] * GPU compute time is unstable, with coefficient of variance = 3.61%.
[11/20/2025-10:00:03] [W]   If not already in use, locking GPU clock frequency or adding --useSpinWait may improve the stability.
[11/20/2025-10:00:03] [I] Explanations of the performance metrics are printed in the verbose logs.
[11/20/2025-10:00:03] [I]
&&&& PASSED TensorRT.trtexec [TensorRT v101300] [b35] # trtexec --loadEngine=model.engine
"""


def test_trtexec_command_pins_every_timing_choice():
    from kiln.backends.trt import trtexec

    s = trtexec.Settings(warmup_ms=200, iterations=50, duration_s=2.0)
    cmd = trtexec.command("trtexec", "e.engine", {"images": [8, 3, 256, 256], "orig_target_sizes": [8, 2]}, s)
    assert cmd == ["trtexec", "--loadEngine=e.engine", "--shapes=images:8x3x256x256,orig_target_sizes:8x2",
                   "--warmUp=200", "--iterations=50", "--duration=2", "--useSpinWait", "--useCudaGraph"]
    off = trtexec.Settings(warmup_ms=10, iterations=5, duration_s=0.05, spin_wait=False, data_transfers=False,
                           cuda_graph=False)
    cmd = trtexec.command("trtexec", "e.engine", {"images": [1, 3, 32, 32]}, off, profile=1)
    assert "--useProfile=1" in cmd and "--noDataTransfers" in cmd and "--duration=1" in cmd
    assert "--useSpinWait" not in cmd and "--useCudaGraph" not in cmd
    rtx_new = trtexec.command("tensorrt_rtx", "e.engine", {}, s, flavor="tensorrt-rtx",
                              help_text="  --rtxCudaGraphStrategy=strategy  ...")
    assert "--rtxCudaGraphStrategy=wholeGraph" in rtx_new and "--useCudaGraph" not in rtx_new
    assert "--useCudaGraph" in trtexec.command("tensorrt_rtx", "e.engine", {}, s, flavor="tensorrt-rtx")


def test_trtexec_output_is_parsed_and_settings_checked():
    from kiln.backends.trt import trtexec

    r = trtexec.parse(TRTEXEC_OUTPUT)
    assert r["version"] == "101300" and r["passed"] is True
    assert r["settings"] == {"iterations": 50, "duration_s": 2.0, "warmup_ms": 200.0, "data_transfers": True,
                             "spin_wait": True, "cuda_graph": True}
    assert r["throughput_qps"] == 1220.53
    assert r["latency"]["median_ms"] == 0.853271 and r["latency"]["p99_ms"] == 0.93689
    assert r["compute"] == {"min_ms": 0.79541, "max_ms": 1.09131, "mean_ms": 0.819012, "median_ms": 0.815918,
                            "p90_ms": 0.828369, "p95_ms": 0.834473, "p99_ms": 0.897217}
    assert r["h2d"]["mean_ms"] == 0.0319302 and r["d2h"]["max_ms"] == 0.0146484 and r["enqueue"]["p95_ms"] == 0.0299805
    assert r["total_host_walltime_s"] == 2.00196 and r["total_gpu_compute_s"] == 1.99924
    assert any("unstable" in w for w in r["warnings"])
    asked = trtexec.Settings(warmup_ms=200, iterations=50, duration_s=2.0)
    assert trtexec.compare_settings(asked, r["settings"]) == []
    no_graph = trtexec.parse(TRTEXEC_OUTPUT.replace("CUDA Graph: Enabled", "CUDA Graph: Disabled"))
    assert trtexec.compare_settings(asked, no_graph["settings"]) == ["cuda graph: asked on, trtexec ran it off"]
    assert "compute" not in trtexec.parse("&&&& FAILED TensorRT.trtexec [TensorRT v101300]")


def test_trtexec_run_records_a_failing_tool(tmp_path):
    """A stand-in executable that prints an error and exits 1: the record says so, with no numbers."""
    import os
    import stat

    from kiln.backends.trt import trtexec

    exe = tmp_path / "trtexec"
    exe.write_text("#!/bin/sh\necho '[E] Error opening engine file: e.engine'\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    rec = trtexec.run(str(exe), "e.engine", {"images": [1, 3, 8, 8]}, trtexec.Settings(10, 5, 0.1))
    assert rec["status"] == "failed" and "exited 1" in rec["reason"] and "Error opening engine" in rec["reason"]
    assert "compute" not in rec and rec["command"].startswith(str(exe))
    ok = tmp_path / "ok"
    ok.write_text("#!/bin/sh\ncat <<'X'\n" + TRTEXEC_OUTPUT + "X\n")
    ok.chmod(ok.stat().st_mode | stat.S_IEXEC)
    rec = trtexec.run(str(ok), "e.engine", {"images": [1, 3, 8, 8]}, trtexec.Settings(200, 50, 2.0))
    assert rec["status"] == "measured" and rec["settings_match"] and rec["compute"]["median_ms"] == 0.815918
    assert os.path.basename(rec["command"].split()[0]) == "ok"


# --------------------------------------------------------------------------------------------------
# The TensorRT runner's host-side logic


def test_bf16_and_fp8_host_conversions():
    from kiln.backends.trt.io import from_storage, to_storage

    x = np.array([0.0, 1.0, -2.5, 3.140625, 1e-3, np.nan], dtype=np.float32)
    bits = to_storage(x, "BF16")
    assert bits.dtype == np.uint16 and bits[1] == 0x3F80 and bits[2] == 0xC020
    back = from_storage(bits, "BF16")
    np.testing.assert_allclose(back[:5], x[:5], rtol=2 ** -8)
    assert np.isnan(back[5])
    # Round to nearest even: 1 + 2^-8 sits halfway between 1 and 1 + 2^-7 -> 1.
    assert to_storage(np.float32(1 + 2 ** -8), "BF16") == 0x3F80
    codes = to_storage(np.array([0.0, 1.0, -1.5, 448.0, 1000.0, 0.3], dtype=np.float32), "FP8")
    assert list(codes[:5]) == [0x00, 0x38, 0xBC, 0x7E, 0x7E]  # 1000 saturates to 448
    np.testing.assert_allclose(from_storage(codes, "FP8")[:5], [0.0, 1.0, -1.5, 448.0, 448.0])
    assert abs(from_storage(codes, "FP8")[5] - 0.3) <= 0.3 * 2 ** -3  # 3 mantissa bits
    assert np.isnan(from_storage(np.array([0x7F], dtype=np.uint8), "FP8")[0])
    assert to_storage(np.array([[1.7, 2.2]]), "INT64").dtype == np.int64


def _tensors():
    from kiln.backends.trt.io import TensorInfo

    return [
        TensorInfo("images", True, "FLOAT", (-1, 3, 4, 4),
                   (((1, 3, 4, 4), (4, 3, 4, 4), (4, 3, 4, 4)), ((5, 3, 4, 4), (8, 3, 4, 4), (8, 3, 4, 4)))),
        TensorInfo("sizes", True, "INT64", (-1, 2), (((1, 2), (4, 2), (4, 2)), ((5, 2), (8, 2), (8, 2)))),
        TensorInfo("mean", False, "HALF", (-1, 3)),
    ]


def test_profile_selection_and_max_batch():
    from kiln.backends.trt.io import max_batch_of, select_profile

    t = _tensors()
    assert select_profile(t, {"images": (2, 3, 4, 4), "sizes": (2, 2)}) == 0
    assert select_profile(t, {"images": (6, 3, 4, 4), "sizes": (6, 2)}) == 1
    with pytest.raises(KilnError, match=r"fit none of the engine's optimization profiles \(profile 0: images"):
        select_profile(t, {"images": (9, 3, 4, 4), "sizes": (9, 2)})
    with pytest.raises(KilnError, match="fit none"):
        select_profile(t, {"images": (2, 3, 8, 8), "sizes": (2, 2)})
    with pytest.raises(KilnError, match="no feed for engine input"):
        select_profile(t, {"images": (2, 3, 4, 4)})
    assert max_batch_of(t) == 8


def test_static_engine_inputs_get_a_fixed_profile():
    from kiln.backends.trt.io import describe_io, select_profile

    class Static(FakeEngine):
        num_optimization_profiles = 1
        io = [("images", "in", "FLOAT", (1, 3, 4, 4)), ("mean", "out", "HALF", (1, 3))]

        def __init__(self):
            self.num_io_tensors = 2

        def get_tensor_profile_shape(self, name, k):
            raise RuntimeError("not in any profile")

    t = describe_io(Static(), FakeTrt)
    assert t[0].profiles == (((1, 3, 4, 4),) * 3,)
    assert select_profile(t, {"images": (1, 3, 4, 4)}) == 0
    with pytest.raises(KilnError, match="fit none"):
        select_profile(t, {"images": (2, 3, 4, 4)})


class FakeCudart:
    """cuda.bindings.runtime's calls the runner makes, on host memory, with stream capture recorded."""

    class cudaError_t:  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorNotReady = 600
        cudaErrorStreamCaptureInvalidated = 901

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    def __init__(self):
        self.arrays = {}
        self.capturing = None
        self.launches = 0
        self.calls = []

    def _alloc(self, n):
        a = np.zeros(n, dtype=np.uint8)
        self.arrays[a.ctypes.data] = a
        return 0, a.ctypes.data

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, p):
        self.arrays.pop(p, None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 7

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def run(self, fn):
        """Execute now, or record into the graph being captured."""
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        import ctypes

        self.calls.append(("memcpy", kind))
        self.run(lambda: ctypes.memmove(dst, src, n))
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphExecDestroy(self, g):
        return (0,)

    def cudaGraphLaunch(self, g, stream):
        self.launches += 1
        for fn in g:
            fn()
        return (0,)

    def cudaGetLastError(self):
        return (0,)

    def cudaEventCreate(self):
        return 0, {"t": None}

    def cudaEventRecord(self, ev, stream):
        self.clock_us = getattr(self, "clock_us", 0) + 1
        ev["t"] = self.clock_us
        return (0,)

    def cudaEventQuery(self, ev):
        return (0,)

    def cudaEventSynchronize(self, ev):
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return 0, (b["t"] - a["t"]) / 1000.0

    def cudaEventDestroy(self, ev):
        return (0,)

    def cudaGetErrorString(self, err):
        return 0, b"fake error"


class FakeTrt:
    class TensorIOMode:  # noqa: N801
        INPUT, OUTPUT = "in", "out"


class FakeContext:
    """An execution context whose 'kernels' compute per-image channel means (fp16) and size sums (bf16)."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.profile_calls = engine, {}, {}, []

    def set_optimization_profile_async(self, k, stream):
        self.profile_calls.append(k)
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b = self.shapes["images"][0]
        return {"mean": (b, 3), "total": (b,)}.get(name, self.shapes.get(name))

    def set_tensor_address(self, name, addr):
        self.addr[name] = addr
        return True

    def _view(self, name, dtype, shape):
        raw = self.engine.cudart.arrays[self.addr[name]]
        return raw[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def execute_async_v3(self, stream):
        if self.engine.refuse_capture and self.engine.cudart.capturing is not None:
            return False
        b = self.shapes["images"][0]

        def kernel():
            x = self._view("images", np.float32, (b, 3, 4, 4))
            s = self._view("orig_target_sizes", np.int64, (b, 2))
            self._view("mean", np.float16, (b, 3))[:] = x.mean(axis=(2, 3))
            total = s.sum(axis=1).astype(np.float32)
            self._view("total", np.uint16, (b,))[:] = (total.view(np.uint32) >> 16).astype(np.uint16)

        self.engine.cudart.run(kernel)
        return True


class FakeEngine:
    num_optimization_profiles = 2

    def __init__(self, cudart, refuse_capture=False):
        self.cudart, self.refuse_capture = cudart, refuse_capture
        self.io = [("images", "in", "FLOAT", (-1, 3, 4, 4)), ("orig_target_sizes", "in", "INT64", (-1, 2)),
                   ("mean", "out", "HALF", (-1, 3)), ("total", "out", "BF16", (-1,))]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _t(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self._t(name)[1]

    def get_tensor_dtype(self, name):
        return type("DataType", (), {"name": self._t(name)[2]})()

    def get_tensor_shape(self, name):
        return self._t(name)[3]

    def get_tensor_profile_shape(self, name, k):
        lo, hi = (1, 4) if k == 0 else (5, 8)
        rest = self._t(name)[3][1:]
        return [(lo, *rest), (hi, *rest), (hi, *rest)]

    def create_execution_context(self):
        return FakeContext(self)


def _feeds(b):
    rng = np.random.default_rng(b)
    return {"images": rng.random((b, 3, 4, 4), dtype=np.float32),
            "orig_target_sizes": rng.integers(1, 500, size=(b, 2)).astype(np.int64)}


@pytest.mark.parametrize("refuse_capture", [False, True])
def test_runner_shapes_profiles_dtypes_and_graphs(refuse_capture):
    """The runner's orchestration on a stand-in engine and CUDA runtime (host memory, real copies)."""
    from kiln.backends.trt.runner import TrtEngineRunner

    cudart = FakeCudart()
    engine = FakeEngine(cudart, refuse_capture)
    runner = TrtEngineRunner.from_engine(FakeTrt, engine, cudart)
    assert runner.input_names == ("images", "orig_target_sizes") and runner.output_names == ("mean", "total")
    assert runner.max_batch() == 8
    for b in (3, 6, 3):  # profile 0, then 1, then back to 0
        feeds = _feeds(b)
        out = runner.infer(feeds)
        assert out["mean"].dtype == np.float16 and out["mean"].shape == (b, 3)
        np.testing.assert_allclose(out["mean"], feeds["images"].mean(axis=(2, 3)), rtol=1e-3)
        assert out["total"].dtype == np.float32  # bf16 comes back as float32
        np.testing.assert_allclose(out["total"], feeds["orig_target_sizes"].sum(axis=1), rtol=2 ** -7)
    assert runner.context.profile_calls == [1, 0]
    if refuse_capture:
        assert cudart.launches == 0 and "returned False under stream capture" in runner.graph_note
        assert runner.describe()["cuda_graph"].startswith("off (")
    else:
        assert cudart.launches == 3 and runner.graph_note is None  # one captured graph per shape, replayed
        assert runner.describe()["cuda_graph"] == "stream capture"
    marks = []
    step = runner.query(_feeds(2), marks.append)
    cudart.calls.clear()
    step()
    assert marks == ["h2d", "compute", "d2h"]
    assert [k for _, k in cudart.calls] == [1, 1, 2, 2]  # two inputs in, two outputs out
    runner.close()
    assert cudart.arrays == {}  # every buffer freed


def test_runner_without_graphs_enqueues_directly():
    from kiln.backends.trt.runner import TrtEngineRunner

    cudart = FakeCudart()
    runner = TrtEngineRunner.from_engine(FakeTrt, FakeEngine(cudart), cudart, cuda_graph=False)
    out = runner.infer(_feeds(2))
    assert cudart.launches == 0 and runner.cuda_graph == "off" and out["mean"].shape == (2, 3)


@pytest.mark.parametrize("with_tool", [False, True])
def test_gpu_latency_sweeps_the_profile_and_runs_trtexec_alike(with_tool, tmp_path, monkeypatch):
    """The validate stage's GPU path on the stand-in engine: CUDA-event phases per batch, trtexec beside it."""
    import stat
    from types import SimpleNamespace

    from kiln import validate as stage
    from kiln.backends.trt.runner import TrtEngineRunner
    from kiln.batches import Inputs
    from kiln.config import load
    from tests.conftest import tiny_config

    spec = load(tiny_config(), check_paths=False).models["rtdetr_demo"]
    cudart = FakeCudart()
    runner = TrtEngineRunner.from_engine(FakeTrt, FakeEngine(cudart), cudart)
    runner.engine_path = tmp_path / "model.engine"
    rng = np.random.default_rng(0)
    inputs = Inputs(images=rng.integers(0, 255, size=(3, 3, 4, 4), dtype=np.uint8), image_ids=np.arange(3),
                    orig_sizes=np.full((3, 2), 64), ratios=np.ones(3), pads=np.zeros((3, 2)))
    device = SimpleNamespace(backend="tensorrt", batch_sizes=(1, 3))
    L = {"warmup_ms": 0, "min_iterations": 3, "min_seconds": 0, "cv_warn_percent": 2.5}
    exe = None
    if with_tool:
        exe = tmp_path / "trtexec"
        exe.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args.txt") + "\ncat <<'X'\n" + TRTEXEC_OUTPUT + "X\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    from kiln import backends
    from kiln.backends.trt import trtexec

    monkeypatch.setattr(trtexec, "find", lambda flavor: str(exe) if exe else None)
    result = stage._gpu_latency(backends.get(device.backend), runner, spec, device, inputs, L)
    lat = result["latency"]
    assert [x["batch_size"] for x in lat] == [1, 2, 3, 4, 8]  # configured 1 and 3, powers of two up to 8
    assert [x["profile"] for x in lat] == [0, 0, 0, 0, 1]
    for x in lat:
        assert set(x["phases"]) == {"h2d", "compute", "d2h", "enqueue"} and x["depth"] == 2
        assert x["iterations"] >= 3 and x["cuda_graph"] == "stream capture"
        assert x["timer"].startswith("CUDA events (cuda.bindings)")
        # The same query host-timed, each waited for: the check of the events (docs/latency.md).
        check = x["host_check"]
        assert check["timer"] == "host perf_counter, each query waited for" and check["iterations"] >= 3
        assert check["median_ms"] > 0 and check["host_over_events"] == check["median_ms"] / x["median_ms"]
    assert result["latency_method"]["batch_sizes"] == [1, 2, 3, 4, 8] and result["latency_method"]["spin_wait"]
    if with_tool:
        assert [t["batch_size"] for t in result["trtexec"]] == [1, 2, 3, 4, 8]
        # The canned output says it ran 50 iterations where 3 were asked: reported, not hidden.
        assert all(t["status"] == "measured" and not t["settings_match"] for t in result["trtexec"])
        assert result["trtexec"][0]["settings_mismatch"] == ["iterations: asked 3, trtexec reports 50"]
        assert result["trtexec"][0]["compute"]["median_ms"] == 0.815918
        args = (tmp_path / "args.txt").read_text()  # the last call: batch 8 on profile 1
        assert "--shapes=images:8x3x4x4,orig_target_sizes:8x2" in args and "--useProfile=1" in args
        assert "--useSpinWait" in args and "--useCudaGraph" in args and f"--loadEngine={runner.engine_path}" in args
    else:
        assert result["trtexec"] == {"status": "not run", "reason": "trtexec is not on PATH"}
    runner.close()


# --------------------------------------------------------------------------------------------------
# On a GPU with TensorRT (skipped on this CPU-only host)

NO_TRT = "TensorRT is not installable on this CPU-only host"
NO_GPU = "no GPU"


def _gpu_or_skip(flavor: str):
    from kiln.backends.trt.host import detect_host
    from kiln.backends.trt.importer import import_trt

    if import_trt(flavor) is None:
        pytest.skip(NO_TRT if flavor == "tensorrt" else "TensorRT-RTX is not installed")
    host = detect_host()
    if not host.driver or not host.compute_capability:
        pytest.skip(NO_GPU)
    return host


def _relu_mean_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Relu", ["images"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["out"], axes=[2, 3], keepdims=0)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]),
              str(path))
    return path


@pytest.mark.parametrize("flavor", ["tensorrt", "tensorrt-rtx"])
def test_trt_runner_on_gpu(flavor, tmp_path):
    """Build a small engine, run it at two batch sizes, and time it with the CUDA-event harness."""
    host = _gpu_or_skip(flavor)
    from kiln import backends
    from kiln.config import load
    from tests.conftest import tiny_config

    backend = backends.get(flavor)
    raw = tiny_config()
    dev = {"backend": flavor, "compute_capability": host.compute_capability, "precisions": ["fp32"],
           "batch_sizes": [1, 4], "models": ["yolo_demo"]}
    if flavor == "tensorrt":
        from kiln.backends.trt.importer import major_minor, mm_str

        dev["tensorrt"] = {"min": mm_str(major_minor(host.tensorrt))}
    raw["devices"] = {"dev": dev}
    device = load(raw, check_paths=False).devices["dev"]
    reason = backend.check_host(device)
    if reason:
        pytest.skip(reason)
    onnx_path = _relu_mean_onnx(tmp_path / "m.onnx")
    backend.build(onnx_path, tmp_path / "m.engine", device, "fp32")
    runner = backend.load_runner(tmp_path / "m.engine", device)
    for b in (1, 4):
        x = np.random.default_rng(b).standard_normal((b, 3, 16, 16)).astype(np.float32)
        out = runner.infer({"images": x})["out"]
        np.testing.assert_allclose(out, np.maximum(x, 0).mean(axis=(2, 3)), atol=1e-5)
        timer = latency.CudaEventTimer(latency.CudaBindingsEvents(runner.stream, runner.cudart))
        stats = latency.measure(runner.query({"images": x}, timer.mark), b, warmup_ms=10, min_iterations=5,
                                min_seconds=0.01, timer=timer, depth=2)
        assert set(stats.phases) == {"h2d", "compute", "d2h", "enqueue"} and stats.iterations >= 5
    runner.close()
