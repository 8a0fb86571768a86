"""Throughput at N concurrent streams, generic over the steps it times, with trtexec's ``--infStreams`` meaning.

A *stream* is one independent query loop (a camera feeding frames): its own runner (execution
context, buffers, CUDA stream) over an engine the streams share. Two harnesses, both with the
warm-up, ``min_iterations`` and ``min_seconds`` of :func:`kiln.latency.measure`:

* :func:`measure_host` serves host-timed runners (ONNX Runtime on the CPU): one thread per
  stream, started together at a barrier, each timing its own synchronous queries
  (:class:`kiln.latency.HostTimer`), until every stream has ``min_iterations`` and the window has
  lasted ``min_seconds``.
* :func:`measure_device` serves device-timed runners: as trtexec without ``--threads``, one host
  thread enqueues round-robin onto the N streams, each with its own
  :class:`kiln.latency.CudaEventTimer` and ``depth`` queries in flight.

Throughput is every image completed over the host wall time of the timed window; each stream gets
its own p50/p99 and images/s, and the streams' samples pooled give one p50/p99. :func:`best` picks
the stream count to deploy with, by :data:`BEST_RULE`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from kiln.latency import HostTimer, Sample, percentile

# Within this share of the highest images/s, fewer streams are as good: they cost less memory and latency.
BEST_TOLERANCE = 0.05
BEST_RULE = (f"the fewest streams whose images/s is within {BEST_TOLERANCE:.0%} of the highest measured "
             f"(more streams cost a context's memory each and add latency per stream)")


@dataclass(frozen=True)
class StreamStats:
    """One stream's queries in the timed window."""

    stream: int
    iterations: int
    p50_ms: float
    p99_ms: float
    images_per_s: float


@dataclass(frozen=True)
class StreamsStats:
    """N streams timed together: throughput over the window, per-stream and pooled latency."""

    streams: int
    batch_size: int
    images: int  # completed in the timed window, over every stream
    seconds: float  # host wall time of the timed window
    images_per_s: float
    p50_ms: float  # pooled over the streams' queries
    p99_ms: float
    per_stream: tuple[StreamStats, ...]
    timer: str
    depth: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_stream"] = [asdict(s) for s in self.per_stream]
        return d


def _latency_s(sample: Sample) -> float:
    return sample["latency"] if isinstance(sample, dict) else float(sample)


def summarize(samples: Sequence[Sequence[Sample]], batch_size: int, wall_s: float, timer: str,
              depth: int = 1) -> StreamsStats:
    """Statistics of N streams' timed queries; `wall_s` is the host time of the window they shared."""
    if not samples or any(not s for s in samples):
        raise ValueError("every stream needs timed queries to summarize")
    per = []
    for i, ss in enumerate(samples):
        ms = np.sort(np.asarray([_latency_s(s) for s in ss]) * 1e3)
        per.append(StreamStats(i, len(ss), percentile(ms, 50), percentile(ms, 99),
                               batch_size * len(ss) / wall_s if wall_s > 0 else 0.0))
    pooled = np.sort(np.asarray([_latency_s(s) for ss in samples for s in ss]) * 1e3)
    images = batch_size * len(pooled)
    return StreamsStats(
        streams=len(samples), batch_size=batch_size, images=images, seconds=round(wall_s, 4),
        images_per_s=images / wall_s if wall_s > 0 else 0.0, p50_ms=percentile(pooled, 50),
        p99_ms=percentile(pooled, 99), per_stream=tuple(per), timer=timer, depth=depth,
    )


def measure_host(
    steps: Sequence[Callable[[], object]],
    batch_size: int,
    warmup_ms: float = 200.0,
    min_iterations: int = 50,
    min_seconds: float = 2.0,
    clock: Callable[[], float] = time.perf_counter,
) -> StreamsStats:
    """Time N synchronous steps concurrently, one thread each (the steps must be safe to run so)."""
    n = len(steps)
    counts = [0] * n
    samples: list[list[Sample]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    window: dict[str, float] = {}
    ends = [0.0] * n
    start = threading.Barrier(n + 1)  # the streams and this thread: warm-up starts together
    # ... and so does the timed window, its start noted before any stream is released.
    timed = threading.Barrier(n + 1, action=lambda: window.__setitem__("t0", clock()))

    def done() -> bool:
        # Every stream keeps running until all have their queries: the window is N streams throughout.
        return clock() - window["t0"] >= min_seconds and min(counts) >= min_iterations

    def loop(i: int) -> None:
        timer = HostTimer(clock)
        try:
            start.wait()
            t = clock()
            while (clock() - t) * 1e3 < warmup_ms:
                timer(steps[i])
            timed.wait()
            while not done():
                samples[i].append(timer(steps[i]))
                counts[i] += 1
            ends[i] = clock()
        except threading.BrokenBarrierError:
            return
        except BaseException as err:  # re-raised on the caller's thread
            errors.append(err)
            counts[i] = min_iterations  # a failed stream must not hold the others in the window
            start.abort()
            timed.abort()

    threads = [threading.Thread(target=loop, args=(i,), name=f"stream-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        start.wait()
        timed.wait()
    except threading.BrokenBarrierError:
        pass  # a stream failed: its error is raised below
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(ends) - window["t0"]  # to the last stream's last query
    return summarize(samples, batch_size, wall, HostTimer.name + f", {n} thread{'s' if n > 1 else ''}")


def measure_device(
    steps: Sequence[Callable[[], object]],
    timers: Sequence,
    batch_size: int,
    warmup_ms: float = 200.0,
    min_iterations: int = 50,
    min_seconds: float = 2.0,
    depth: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> StreamsStats:
    """Time N device steps from one host thread, enqueued round-robin, each on its own stream and timer.

    ``timers[i]`` is stream i's :class:`kiln.latency.CudaEventTimer` (events recorded on its stream);
    ``steps[i]`` enqueues one query on that stream. Each stream keeps ``depth`` queries in flight: its
    oldest is waited for once it has ``depth``, while the other streams' work stays queued on the GPU.
    """
    n = len(steps)
    if len(timers) != n:
        raise ValueError(f"{n} steps but {len(timers)} timers: one timer per stream")
    depth = max(1, int(depth))

    def run(done: Callable[[list[int], float], bool]) -> tuple[list[list[Sample]], float]:
        inflight: list[deque] = [deque() for _ in range(n)]
        samples: list[list[Sample]] = [[] for _ in range(n)]
        t0 = clock()
        i = 0
        while not done([len(s) + len(q) for s, q in zip(samples, inflight)], clock() - t0):
            inflight[i].append(timers[i].start(steps[i]))
            if len(inflight[i]) >= depth:
                samples[i].append(timers[i].finish(inflight[i].popleft()))
            i = (i + 1) % n
        for k in range(n):  # drain, in the order they were enqueued across streams
            while inflight[k]:
                samples[k].append(timers[k].finish(inflight[k].popleft()))
        return samples, clock() - t0

    # Whole rounds, so that every stream has queried as often as the others.
    run(lambda counts, elapsed: elapsed * 1e3 >= warmup_ms and len(set(counts)) == 1)
    samples, wall = run(lambda counts, elapsed: elapsed >= min_seconds and min(counts) >= min_iterations
                        and len(set(counts)) == 1)
    name = getattr(timers[0], "name", type(timers[0]).__name__)
    return summarize(samples, batch_size, wall, f"{name}, {n} streams round-robin from one thread", depth)


def best(images_per_s: dict[int, float], tolerance: float = BEST_TOLERANCE) -> int:
    """The stream count to deploy with: the fewest whose images/s is within `tolerance` of the highest (BEST_RULE)."""
    if not images_per_s:
        raise ValueError("no stream counts measured")
    top = max(images_per_s.values())
    return min(n for n, ips in images_per_s.items() if ips >= (1.0 - tolerance) * top)
