"""Latency measurement generic over an enqueue function, following trtexec's method.

Warm up for a fixed time, then run at least N iterations and at least T seconds,
timing each iteration with the given timer. The host timer serves CPU devices;
a GPU backend passes a timer built on CUDA events around the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Per-iteration latency in milliseconds and throughput in images per second."""

    batch_size: int
    iterations: int
    seconds: float
    min_ms: float
    max_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    std_ms: float
    cv_percent: float
    throughput_ips: float
    timer: str
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class HostTimer:
    """Wall-clock time of a synchronous step (a CPU backend returns when the work is done)."""

    name = "host perf_counter"

    def __call__(self, step: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0


def percentile(sorted_ms: np.ndarray, p: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, as trtexec reports."""
    return float(np.percentile(sorted_ms, p, method="inverted_cdf"))


def summarize(times_s: list[float], batch_size: int, wall_s: float, timer: str, cv_warn: float = 2.5) -> LatencyStats:
    ms = np.sort(np.asarray(times_s, dtype=np.float64) * 1e3)
    mean = float(ms.mean())
    std = float(ms.std())
    cv = 100.0 * std / mean if mean > 0 else 0.0
    warning = None
    if cv > cv_warn:
        warning = (
            f"coefficient of variation {cv:.1f}% exceeds {cv_warn}%: the host was busy or clocks "
            f"varied; latency numbers may be unstable"
        )
    return LatencyStats(
        batch_size=batch_size,
        iterations=len(ms),
        seconds=round(wall_s, 4),
        min_ms=float(ms[0]),
        max_ms=float(ms[-1]),
        mean_ms=mean,
        median_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        std_ms=std,
        cv_percent=cv,
        throughput_ips=batch_size * len(ms) / float(ms.sum() / 1e3),
        timer=timer,
        warning=warning,
    )


def measure(
    step: Callable[[], object],
    batch_size: int,
    warmup_ms: float = 200.0,
    min_iterations: int = 50,
    min_seconds: float = 2.0,
    cv_warn_percent: float = 2.5,
    timer=None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time `step` (one batch of `batch_size`) after a warm-up, for >= min_iterations and >= min_seconds."""
    timer = timer or HostTimer()
    start = clock()
    while (clock() - start) * 1e3 < warmup_ms:
        step()
    times: list[float] = []
    start = clock()
    while len(times) < min_iterations or clock() - start < min_seconds:
        times.append(timer(step))
    return summarize(times, batch_size, clock() - start, timer.name, cv_warn_percent)
