"""Part of stage `validate`: an engine's throughput at N concurrent streams (validation.json "streams").

At each count of ``validation.streams`` up to the device's ``max_streams``, the runner gives N
runners over its engine (``Runner.streams``: TensorRT execution contexts on their own CUDA streams;
ONNX Runtime threads sharing one session), which kiln.streams times together at batch 1 (a camera
frame per query) where the engine admits it: host-timed runners one thread each, device-timed ones
round-robin from one host thread with CUDA events per stream. The record holds images/s and the
per-stream and pooled p50/p99 at each count, the memory each more stream takes, and ``best``, the
count to deploy with (kiln.streams.BEST_RULE), which the Triton config's instance_group reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kiln import latency
from kiln import streams as harness
from kiln.errors import KilnError

log = logging.getLogger(__name__)


def counts(configured: list[int], max_streams: int, device: str) -> tuple[list[int], list[dict]]:
    """The stream counts to time (sorted) and those dropped, each with why."""
    kept = sorted(n for n in configured if n <= max_streams)
    dropped = [{"streams": n, "reason": f"above devices.{device}.max_streams ({max_streams})"}
               for n in sorted(configured) if n > max_streams]
    return kept, dropped


def batch(spec, device, runner) -> tuple[int, str]:
    """The batch each stream's queries have, and why: 1 (a camera frame) where the engine admits it."""
    if not spec.dynamic_batch:
        b = runner.max_batch() or 1
        return b, f"the model has a static batch of {b}"
    lowest = min((shapes["min"][0] for p in device.profiles for shapes in p.values()), default=1)
    if lowest > 1:
        return lowest, f"the smallest batch devices.{device.name}.profiles admit"
    return 1, "one camera frame per query"


def _memory(runner, extra: int, before: tuple[int, str] | None) -> dict:
    """What each of `extra` more streams took: the engine's figure, else the measured difference."""
    given = runner.context_memory()
    if given.get("bytes") is not None:
        return {"per_context_bytes": given["bytes"], "method": given["method"]}
    if extra == 0:
        return {"per_context_bytes": None, "method": "one stream: no context more to measure"}
    after = runner.memory_in_use()
    if before is None or after is None:
        return {"per_context_bytes": None, "method": "the runner has no memory reading (Runner.memory_in_use)"}
    method = f"{after[1]}, after minus before the {extra} more stream(s)' first run, over {extra}"
    if after[0] <= before[0]:  # a shared arena, or the reading's noise: nothing measurable, never a negative size
        return {"per_context_bytes": None, "method": f"{method}: no growth measured ({after[0] - before[0]} bytes)",
                "before_bytes": before[0], "after_bytes": after[0]}
    return {"per_context_bytes": round((after[0] - before[0]) / extra), "method": method,
            "before_bytes": before[0], "after_bytes": after[0]}


def measure(runner, spec, device, feeds_for: Callable[[int], dict], configured: list[int], L: dict,
            gpu_timing: dict) -> dict:
    """Time the runner's engine at each stream count; the validation.json "streams" record."""
    wanted, dropped = counts(configured, device.max_streams, device.name)
    b, why = batch(spec, device, runner)
    feeds = feeds_for(b)
    rec: dict = {"configured": list(configured), "max_streams": device.max_streams, "batch_size": b,
                 "batch_reason": why, "dropped": dropped, "results": [],
                 "method": ("one host thread enqueuing round-robin onto N CUDA streams, CUDA events per stream, "
                            f"{gpu_timing['depth']} queries in flight per stream (trtexec --infStreams)"
                            if runner.device_timed else
                            "one host thread per stream, started together, host perf_counter per query")}
    for i, n in enumerate(wanted):
        before = runner.memory_in_use()
        try:
            runners = runner.streams(n)
        except (NotImplementedError, KilnError) as err:
            rec["dropped"] += [{"streams": m, "reason": str(err)} for m in wanted[i:]]
            log.warning("streams %d: %s", n, err)
            break
        log.info("streams %d at batch %d (%s)", n, b, "CUDA events per stream" if runner.device_timed
                 else "one thread per stream")
        try:
            stats, memory = _time(runner, runners, feeds, b, L, gpu_timing, before)
        finally:
            for r in runners[1:]:
                r.close()
        rec["results"].append({**stats.to_dict(), "memory": memory})
        log.info("streams %d: %.1f images/s, p50 %.2f ms, p99 %.2f ms", n, stats.images_per_s, stats.p50_ms,
                 stats.p99_ms)
    rec["dropped"].sort(key=lambda d: d["streams"])
    ips = {r["streams"]: r["images_per_s"] for r in rec["results"]}
    rec["images_per_s"] = {str(n): v for n, v in ips.items()}
    rec["best"] = harness.best(ips) if ips else None
    rec["best_rule"] = harness.BEST_RULE
    measured = [r["memory"] for r in rec["results"] if r["memory"].get("per_context_bytes") is not None]
    rec["context_memory"] = measured[-1] if measured else {"per_context_bytes": None, "method": "not measured"}
    if ips:
        log.info("streams: best %d (%.1f images/s): %s", rec["best"], ips[rec["best"]], harness.BEST_RULE)
    return rec


def _time(runner, runners: list, feeds: dict, b: int, L: dict, gpu_timing: dict, before):
    """One count's timing, and the memory its extra streams took after their first run."""
    args = (b, L["warmup_ms"], L["min_iterations"], L["min_seconds"])
    if not runner.device_timed:
        for r in runners:  # the first run: allocations each stream makes once
            r.infer(feeds)
        memory = _memory(runner, len(runners) - 1, before)
        return harness.measure_host([lambda r=r: r.infer(feeds) for r in runners], *args), memory
    events = [latency.CudaBindingsEvents(r.stream, r.cudart) for r in runners]
    try:
        timers = [latency.CudaEventTimer(e, spin_wait=gpu_timing["spin_wait"]) for e in events]
        steps = [r.query(feeds, t.mark) for r, t in zip(runners, timers)]  # each runs once, captures its graph
        memory = _memory(runner, len(runners) - 1, before)
        return harness.measure_device(steps, timers, *args, depth=gpu_timing["depth"]), memory
    finally:
        for e in events:
            e.close()
