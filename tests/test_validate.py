"""Parity metrics, the latency harness and the pass/fail gates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kiln.validate import gate, latency, parity


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
    det = {"parity": {"outputs": {}, "detections": {"match_rate": 0.5}}, "accuracy": {"map50_drop": 0, "map_drop": 0}}
    assert gate("rtdetr", THRESH, det) == ["detection match rate 0.500 < 0.9"]
