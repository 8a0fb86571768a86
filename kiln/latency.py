"""Latency measurement generic over an enqueue function, following trtexec's method.

The harness (:func:`measure`) warms up for a fixed time, then runs at least N queries and at
least T seconds, each query timed by a *timer*. It knows nothing about what a query does:

* :class:`HostTimer` serves CPU devices: ``time.perf_counter`` around a synchronous step.
* :class:`CudaEventTimer` serves GPU devices: CUDA events recorded on the query's stream before
  and after the step (and at each ``mark``), read back once the work is done, as trtexec does.
  The events come from an :class:`EventBackend`: :class:`CudaBindingsEvents` (``cuda.bindings``,
  used by the TensorRT runners) or :class:`TorchCudaEvents` (``torch.cuda.Event``, used by the
  PyTorch baseline and bench/latency_gpu.py).

A step may call ``timer.mark(name)`` where one phase of the query ends: the GPU runners mark
``h2d``, ``compute`` and ``d2h`` (trtexec's H2D Latency, GPU Compute Time and D2H Latency), the
detection pipeline marks ``preprocess``, ``engine`` and ``postprocess``. Each phase runs from the
previous mark (or the start) to its own mark; the query's latency runs from the start to the end.
A CUDA event timer also reports the host time the step took to enqueue its work (trtexec's
Enqueue Time).

Like trtexec, the GPU path keeps ``depth`` queries in flight (default 2 there: "enqueue batch 1,
wait until batch 0 is done, enqueue batch 2, ..."), so the host enqueues the next query while the
GPU runs the current one; throughput is queries over the host wall time of the timed run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

# A sample is the query's latency in seconds, or a dict of seconds with key "latency" and one key
# per phase (h2d, compute, d2h, enqueue, preprocess, ...).
Sample = float | dict[str, float]

STAT_KEYS = ("min_ms", "max_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "std_ms", "cv_percent")


@dataclass(frozen=True)
class LatencyStats:
    """Per-query latency in milliseconds, throughput, and the statistics of each phase."""

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
    throughput_ips: float  # images per second: batch x queries / host wall time
    timer: str
    warning: str | None = None
    throughput_qps: float = 0.0  # queries per second, as trtexec's "Throughput"
    depth: int = 1  # queries in flight
    phases: dict | None = None  # phase -> the same statistics (keys of STAT_KEYS)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_ms: np.ndarray, p: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, as trtexec reports."""
    return float(np.percentile(sorted_ms, p, method="inverted_cdf"))


def stats_ms(times_s: Sequence[float]) -> dict[str, float]:
    """min/max/mean/median/p90/p95/p99/std (ms) and coefficient of variation (%) of times in seconds."""
    ms = np.sort(np.asarray(times_s, dtype=np.float64) * 1e3)
    mean = float(ms.mean())
    std = float(ms.std())
    return {
        "min_ms": float(ms[0]),
        "max_ms": float(ms[-1]),
        "mean_ms": mean,
        "median_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "std_ms": std,
        "cv_percent": 100.0 * std / mean if mean > 0 else 0.0,
    }


def summarize(
    samples: Sequence[Sample], batch_size: int, wall_s: float, timer: str, cv_warn: float = 2.5, depth: int = 1
) -> LatencyStats:
    """Statistics of timed queries; `wall_s` is the host time from the first enqueue to the last completion."""
    if not samples:
        raise ValueError("no timed queries to summarize")
    latency = [s["latency"] if isinstance(s, dict) else float(s) for s in samples]
    names: list[str] = []
    for s in samples:
        if isinstance(s, dict):
            names += [k for k in s if k != "latency" and k not in names]
    phases = {n: stats_ms([s[n] for s in samples if isinstance(s, dict) and n in s]) for n in names} or None
    main = stats_ms(latency)
    warnings = []
    if main["cv_percent"] > cv_warn:
        warnings.append(
            f"coefficient of variation {main['cv_percent']:.1f}% exceeds {cv_warn}%: the host was busy or clocks "
            f"varied; latency numbers may be unstable"
        )
    if phases and "compute" in phases and phases["compute"]["cv_percent"] > cv_warn:
        warnings.append(f"GPU compute time is unstable, with coefficient of variation "
                        f"{phases['compute']['cv_percent']:.1f}% (> {cv_warn}%)")
    n = len(latency)
    wall = wall_s if wall_s > 0 else sum(latency)
    return LatencyStats(
        batch_size=batch_size,
        iterations=n,
        seconds=round(wall_s, 4),
        **main,
        throughput_ips=batch_size * n / wall if wall > 0 else 0.0,
        timer=timer,
        warning="; ".join(warnings) or None,
        throughput_qps=n / wall if wall > 0 else 0.0,
        depth=depth,
        phases=phases,
    )


def phases_from_marks(start: Any, marks: Sequence[tuple[str, Any]], end: Any,
                      elapsed_s: Callable[[Any, Any], float]) -> dict[str, float]:
    """{"latency": start..end, <mark>: previous mark..this mark} in seconds; repeated marks add up."""
    out = {"latency": elapsed_s(start, end)}
    prev = start
    for name, t in marks:
        out[name] = out.get(name, 0.0) + elapsed_s(prev, t)
        prev = t
    return out


# --------------------------------------------------------------------------------------------------
# Timers


class HostTimer:
    """Wall-clock time of a synchronous step (a CPU backend returns when the work is done).

    ``mark(name)`` inside the step splits the time into phases (host timestamps).
    """

    name = "host perf_counter"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._marks: list[tuple[str, float]] | None = None

    def mark(self, name: str) -> None:
        if self._marks is not None:
            self._marks.append((name, self.clock()))

    def start(self, step: Callable[[], object]) -> Sample:
        self._marks = []
        t0 = self.clock()
        step()
        t1 = self.clock()
        marks, self._marks = self._marks, None
        if not marks:
            return t1 - t0
        return phases_from_marks(t0, marks, t1, lambda a, b: b - a)

    def finish(self, handle: Sample) -> Sample:
        return handle

    def __call__(self, step: Callable[[], object]) -> Sample:
        return self.finish(self.start(step))


class EventBackend(Protocol):
    """CUDA events on one stream: what :class:`CudaEventTimer` needs."""

    name: str

    def create(self) -> Any: ...
    def record(self, event: Any) -> None: ...
    def query(self, event: Any) -> bool: ...
    def synchronize(self, event: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...


class _Query:
    __slots__ = ("start", "end", "marks", "enqueue_s")

    def __init__(self, start: Any):
        self.start = start
        self.end = None
        self.marks: list[tuple[str, Any]] = []
        self.enqueue_s = 0.0


class CudaEventTimer:
    """Time GPU work a step enqueues on one stream with CUDA events, as trtexec does.

    ``start(step)`` records an event, runs the step (which only enqueues work, and may call
    ``mark``), records an end event and notes the host time the step took (enqueue time).
    ``finish(handle)`` waits for the end event, busy-polling it (``spin_wait``, trtexec's
    ``--useSpinWait``) or blocking on it, and returns the event-measured latency and phases.
    Events are recycled once their query is finished.
    """

    def __init__(self, events: EventBackend, spin_wait: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.events = events
        self.spin_wait = spin_wait
        self.clock = clock
        self.name = f"CUDA events ({events.name}){', spin-wait' if spin_wait else ''}"
        self._free: list[Any] = []
        self._current: _Query | None = None

    def _event(self) -> Any:
        return self._free.pop() if self._free else self.events.create()

    def mark(self, name: str) -> None:
        if self._current is None:
            return
        ev = self._event()
        self.events.record(ev)
        self._current.marks.append((name, ev))

    def start(self, step: Callable[[], object]) -> _Query:
        q = _Query(self._event())
        self._current = q
        t0 = self.clock()
        try:
            self.events.record(q.start)
            step()
            q.end = self._event()
            self.events.record(q.end)
        finally:
            self._current = None
        q.enqueue_s = self.clock() - t0
        return q

    def finish(self, q: _Query) -> dict[str, float]:
        if self.spin_wait:
            while not self.events.query(q.end):
                pass
        else:
            self.events.synchronize(q.end)
        sample = phases_from_marks(q.start, q.marks, q.end, lambda a, b: self.events.elapsed_ms(a, b) / 1e3)
        sample["enqueue"] = q.enqueue_s
        self._free += [q.start, q.end, *(ev for _, ev in q.marks)]
        return sample

    def __call__(self, step: Callable[[], object]) -> dict[str, float]:
        return self.finish(self.start(step))


class CudaBindingsEvents:
    """CUDA events through cuda-python (``cuda.bindings.runtime``) on a given stream."""

    name = "cuda.bindings"

    def __init__(self, stream: Any = 0, cudart: Any = None):
        if cudart is None:
            from cuda.bindings import runtime as cudart
        self.cudart = cudart
        self.stream = stream
        self._created: list[Any] = []

    def _check(self, result: tuple) -> tuple:
        err, rest = result[0], result[1:]
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {getattr(err, 'name', err)}")
        return rest

    def create(self) -> Any:
        (ev,) = self._check(self.cudart.cudaEventCreate())
        self._created.append(ev)
        return ev

    def record(self, event: Any) -> None:
        self._check(self.cudart.cudaEventRecord(event, self.stream))

    def query(self, event: Any) -> bool:
        (err,) = self.cudart.cudaEventQuery(event)
        if err == self.cudart.cudaError_t.cudaSuccess:
            return True
        if err == self.cudart.cudaError_t.cudaErrorNotReady:
            return False
        raise RuntimeError(f"CUDA error {getattr(err, 'name', err)}")

    def synchronize(self, event: Any) -> None:
        self._check(self.cudart.cudaEventSynchronize(event))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        (ms,) = self._check(self.cudart.cudaEventElapsedTime(start, end))
        return float(ms)

    def close(self) -> None:
        while self._created:
            self.cudart.cudaEventDestroy(self._created.pop())


class TorchCudaEvents:
    """CUDA events through ``torch.cuda.Event`` on a torch stream (default: the current one)."""

    name = "torch.cuda.Event"

    def __init__(self, stream: Any = None):
        import torch

        self.torch = torch
        self.stream = stream if stream is not None else torch.cuda.current_stream()

    def create(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event: Any) -> None:
        event.record(self.stream)

    def query(self, event: Any) -> bool:
        return bool(event.query())

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))


# --------------------------------------------------------------------------------------------------
# The harness


def measure(
    step: Callable[[], object],
    batch_size: int,
    warmup_ms: float = 200.0,
    min_iterations: int = 50,
    min_seconds: float = 2.0,
    cv_warn_percent: float = 2.5,
    timer=None,
    clock: Callable[[], float] = time.perf_counter,
    depth: int = 1,
) -> LatencyStats:
    """Time `step` (one query of `batch_size`) after a warm-up, for >= min_iterations and >= min_seconds.

    `timer` is a :class:`HostTimer` (default), a :class:`CudaEventTimer`, or any callable
    ``timer(step) -> seconds``. Timers with ``start``/``finish`` can keep `depth` queries in
    flight; warm-up queries go through the timer too and are discarded.
    """
    timer = timer if timer is not None else HostTimer()
    start = getattr(timer, "start", None)
    finish = getattr(timer, "finish", None)
    if start is None or finish is None:
        start, finish, depth = timer, (lambda handle: handle), 1
    depth = max(1, int(depth))

    def run(done: Callable[[int, float], bool]) -> tuple[list[Sample], float]:
        inflight: deque = deque()
        samples: list[Sample] = []
        t0 = clock()
        while not done(len(samples) + len(inflight), clock() - t0):
            inflight.append(start(step))
            if len(inflight) >= depth:
                samples.append(finish(inflight.popleft()))
        while inflight:
            samples.append(finish(inflight.popleft()))
        return samples, clock() - t0

    run(lambda n, elapsed: elapsed * 1e3 >= warmup_ms)
    samples, wall = run(lambda n, elapsed: n >= min_iterations and elapsed >= min_seconds)
    return summarize(samples, batch_size, wall, getattr(timer, "name", type(timer).__name__), cv_warn_percent, depth)


def batch_sweep(batch_sizes: Sequence[int], max_batch: int | None = None) -> list[int]:
    """Batch sizes to time: the configured ones within the engine's largest batch, powers of two below it, and it."""
    sizes = {int(b) for b in batch_sizes}
    if max_batch:
        b = 1
        while b < max_batch:
            sizes.add(b)
            b *= 2
        sizes = {s for s in sizes if s <= max_batch} | {int(max_batch)}
    return sorted(sizes)


def median_at(record: dict | None, batch: int = 1) -> float | None:
    """Median latency (ms) of a baseline or validation record's latency list at `batch`."""
    if not record:
        return None
    for lat in record.get("latency") or []:
        if lat.get("batch_size") == batch:
            return lat.get("median_ms")
    return None
