"""Check Kiln's latency harness on a real GPU against plain CUDA-event timing and the hardware floor.

For a few PyTorch workloads (chains of bf16 GEMMs and a bf16 conv stack at several sizes) this
times the same CUDA work four ways:

* Kiln's harness (kiln.latency.measure) with a CUDA-event timer on torch.cuda.Event,
  two queries in flight as in validation (``harness_ms``);
* the same with the cuda.bindings event timer the TensorRT runners use (``harness_cb_ms``);
* plain torch.cuda.Event pairs around each of N back-to-back calls (``plain_ms``);
* the host clock around call + torch.cuda.synchronize() (``host_sync_ms``, launch and sync
  overhead included);

and sets each against its floor: max(FLOPs / peak dense bf16 FLOP/s, bytes / peak memory
bandwidth) for the GPU the driver reports. One workload also runs with H2D and D2H copies and
``mark``s, so the harness's per-phase (H2D / compute / D2H) times can be checked against plain
events around the forward alone. Finally kiln.backends.cuda.capture_graph captures a GEMM
chain into a CUDA graph through cuda.bindings and the graph's replay is timed and checked.

Usage: python bench/latency_gpu.py [--out DIR] [--seconds 0.5]. Writes DIR/latency_gpu.json and
prints a Markdown table. Needs torch with CUDA and cuda-bindings.

Streams mode, ``--streams 1,2,4,8``: throughput at N concurrent streams with Kiln's streams harness
(kiln.streams.measure_device, as validation times TensorRT's execution contexts). The stand-in engine
is a bf16 conv stack at batch 1 whose weights all streams share; each stream is its own "context": its
own torch.cuda.Stream, input and output buffers and CUDA graph captured on that stream, timed by its
own kiln.latency.CudaEventTimer on kiln.latency.TorchCudaEvents, one host thread enqueuing
round-robin with two queries in flight per stream. Writes DIR/latency_gpu_streams.json (images/s,
pooled and per-stream p50/p99 at each count, best by kiln.streams.BEST_RULE, memory per context from
torch.cuda.memory_allocated before and after making the contexts) and prints a table. Needs torch
with CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from kiln import latency  # noqa: E402  (kiln/latency.py and kiln/streams.py import only numpy)
from kiln import streams as kiln_streams  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak and memory bandwidth from NVIDIA's datasheets, matched
# against the name the driver reports, most specific first.
PEAKS = [
    ("H200", 989.4e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989.4e12, 3.35e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
]


def peak_for(name: str):
    for key, flops, bw in PEAKS:
        if key.lower() in name.lower():
            return key, flops, bw
    return None, None, None


def gpu_info(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        from cuda.bindings import runtime as cudart

        info["cuda_bindings"] = __import__("cuda.bindings", fromlist=["__version__"]).__version__
        err, v = cudart.cudaDriverGetVersion()
        info["driver_cuda"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception as err:  # reported, not fatal
        info["cuda_bindings"] = f"unavailable: {err}"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = out.splitlines()[0] if out else None
    except Exception:
        info["nvidia_smi"] = None
    return info


# --------------------------------------------------------------------------------------------------
# Workloads: (name, fn, flops, bytes) with fn() enqueuing the work on the current stream


def gemm_chain(torch, n: int, layers: int = 8):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g) / n**0.5 for _ in range(layers)]

    def fn():
        y = x
        for w in ws:
            y = y @ w
        return y

    flops = layers * 2 * n**3
    nbytes = layers * 3 * n * n * 2  # each GEMM reads A and B and writes C once, bf16
    return f"gemm chain {layers}x {n}^3 bf16", fn, flops, nbytes


def conv_stack(torch, batch: int, channels: int = 128, size: int = 128, layers: int = 8):
    nn = torch.nn
    convs = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(layers)])
    convs = convs.to("cuda", dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)

    def fn():
        with torch.inference_mode():
            return convs(x)

    act = batch * channels * size * size * 2
    flops = layers * 2 * batch * channels * size * size * channels * 9
    nbytes = layers * (2 * act + channels * channels * 9 * 2)
    return f"conv stack {layers}x {channels}ch 3x3 {size}x{size} batch {batch} bf16", fn, flops, nbytes, convs


# --------------------------------------------------------------------------------------------------
# Timing


def plain_events(torch, fn, n: int) -> list[float]:
    """torch.cuda.Event pairs around each of n back-to-back calls, read after one final sync (ms)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def harness(fn, timer, seconds: float, depth: int = 2):
    return latency.measure(fn, 1, warmup_ms=100, min_iterations=50, min_seconds=seconds, timer=timer, depth=depth)


def time_workload(torch, name, fn, flops, nbytes, peak, seconds) -> dict:
    import statistics

    stream = torch.cuda.current_stream()
    h = harness(fn, latency.CudaEventTimer(latency.TorchCudaEvents(stream)), seconds)
    row = {"workload": name, "flops": flops, "bytes": nbytes,
           "harness": h.to_dict()}
    try:
        cb = latency.CudaEventTimer(latency.CudaBindingsEvents(stream.cuda_stream))
        row["harness_cb"] = harness(fn, cb, seconds).to_dict()
        cb.events.close()
    except Exception as err:
        row["harness_cb"] = {"error": f"{type(err).__name__}: {err}"}

    def synced():
        fn()
        torch.cuda.synchronize()

    row["host_sync"] = harness(synced, latency.HostTimer(), seconds, depth=1).to_dict()
    # As many plain iterations as the harness ran (at least 50), so both see the same clocks.
    n = max(50, h.iterations)
    plain = plain_events(torch, fn, n)
    row["plain_ms"] = {"median": statistics.median(plain), "mean": statistics.fmean(plain), "n": n,
                       "min": min(plain), "max": max(plain)}
    _, pf, pb = peak
    if pf:
        row["floor_ms"] = max(flops / pf, nbytes / pb) * 1e3
        row["floor_bound"] = "compute" if flops / pf >= nbytes / pb else "memory"
    return row


def phased(torch, fn_model, x_host, out_host, seconds, x_dev) -> dict:
    """H2D copy, forward, D2H copy with marks; compute phase vs plain events around the forward alone."""
    import statistics

    stream = torch.cuda.current_stream()
    timer = latency.CudaEventTimer(latency.CudaBindingsEvents(stream.cuda_stream))

    def step():
        x_dev.copy_(x_host, non_blocking=True)
        timer.mark("h2d")
        y = fn_model(x_dev)
        timer.mark("compute")
        out_host.copy_(y, non_blocking=True)
        timer.mark("d2h")

    h = harness(step, timer, seconds)
    timer.events.close()

    def fwd():
        return fn_model(x_dev)

    plain = plain_events(torch, fwd, max(50, h.iterations))
    return {"harness": h.to_dict(), "plain_forward_ms": statistics.median(plain),
            "h2d_bytes": x_host.numel() * x_host.element_size(),
            "d2h_bytes": out_host.numel() * out_host.element_size()}


def graph_check(torch, n: int, layers: int, seconds: float) -> dict:
    """Capture a GEMM chain with kiln.backends.cuda.capture_graph (cuda.bindings) and replay it."""
    import statistics

    from kiln.backends.cuda import CudaRuntime, capture_graph

    rt = CudaRuntime()
    s = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g) / n**0.5 for _ in range(layers)]
    bufs = [torch.empty(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]

    def eager():
        y = x
        for w, b in zip(ws, bufs):
            torch.matmul(y, w, out=b)
            y = b
        return y

    out: dict = {"workload": f"gemm chain {layers}x {n}^3 bf16, CUDA graph"}
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up on this stream: cuBLAS sets up its workspace outside the capture
            eager()
        s.synchronize()
        ref = eager().clone()
        s.synchronize()
        graph, reason = capture_graph(rt, s.cuda_stream, eager)
        out["captured"] = graph is not None
        out["reason"] = reason
        if graph is None:
            return out
        bufs[-1].zero_()
        rt("cudaGraphLaunch", graph, s.cuda_stream)
        s.synchronize()
        out["replay_matches_eager"] = bool(torch.equal(bufs[-1], ref))

        def launch():
            rt("cudaGraphLaunch", graph, s.cuda_stream)

        t = latency.CudaEventTimer(latency.CudaBindingsEvents(s.cuda_stream))
        out["graph"] = harness(launch, t, seconds).to_dict()
        t2 = latency.CudaEventTimer(latency.CudaBindingsEvents(s.cuda_stream))
        out["eager"] = harness(eager, t2, seconds).to_dict()
        t.events.close()
        t2.events.close()
        out["plain_graph_ms"] = statistics.median(plain_events(torch, launch, 100))
        rt("cudaGraphExecDestroy", graph)
    return out


def runner_check(seconds: float) -> dict:
    """TrtEngineRunner over a stand-in engine (CuPy kernel on the runner's stream), on real CUDA."""
    import cupy as cp
    import numpy as np

    from kiln.backends.trt.runner import TrtEngineRunner

    class Trt:
        class TensorIOMode:
            INPUT, OUTPUT = "in", "out"

    def view(ptr, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(int(ptr), n, None), 0))

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.profiles = {}, {}, []

        def set_optimization_profile_async(self, k, stream):
            self.profiles.append(k)
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes["images"] if name == "out" else self.shapes[name]

        def set_tensor_address(self, name, addr):
            self.addr[name] = addr
            return True

        def execute_async_v3(self, stream):
            shape = self.shapes["images"]
            with cp.cuda.ExternalStream(stream):
                x = view(self.addr["images"], np.float32, shape)
                cp.multiply(x, 2, out=view(self.addr["out"], np.float16, shape))  # no allocation: capturable
            return True

    class Engine:
        num_optimization_profiles = 2
        io = {"images": ("in", "FLOAT"), "out": ("out", "HALF")}
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return type("DataType", (), {"name": self.io[name][1]})()

        def get_tensor_shape(self, name):
            return (-1, 3, 64, 64)

        def get_tensor_profile_shape(self, name, k):
            lo, hi = (1, 4) if k == 0 else (5, 16)
            return [(lo, 3, 64, 64), (hi, 3, 64, 64), (hi, 3, 64, 64)]

        def create_execution_context(self):
            return Context()

    runner = TrtEngineRunner.from_engine(Trt, Engine(), None)
    out: dict = {"checks": {}}
    for b in (2, 8, 2):
        x = np.random.default_rng(b).standard_normal((b, 3, 64, 64)).astype(np.float32)
        y = runner.infer({"images": x})["out"]
        out["checks"][f"batch {b}"] = bool(y.dtype == np.float16 and np.array_equal(y, (x * 2).astype(np.float16)))
    out["profiles_switched_to"] = list(runner.context.profiles)
    out["cuda_graph"] = runner.describe()["cuda_graph"]
    x = np.ones((8, 3, 64, 64), dtype=np.float32)
    timer = latency.CudaEventTimer(latency.CudaBindingsEvents(runner.stream, runner.cudart))
    stats = latency.measure(runner.query({"images": x}, timer.mark), 8, warmup_ms=50, min_iterations=50,
                            min_seconds=seconds, timer=timer, depth=2)
    timer.events.close()
    out["query"] = stats.to_dict()
    runner.close()
    return out


def baseline_check(seconds: float) -> dict:
    """kiln.baseline.measure_cuda (the PyTorch eager baseline's GPU path) on the demo YOLO, random weights."""
    import types

    import numpy as np
    import torch

    from kiln import baseline
    from kiln.demo.models import yolo_demo

    torch.manual_seed(0)
    module = yolo_demo(num_classes=3).eval().to("cuda")
    spec = types.SimpleNamespace(input_names=("images",))
    L = {"warmup_ms": 100, "min_iterations": 50, "min_seconds": seconds, "cv_warn_percent": 2.5}
    out = {}
    for b in (1, 8):
        feeds = {"images": np.random.default_rng(b).random((b, 3, 256, 256), dtype=np.float32)}
        out[f"batch {b}"] = baseline.measure_cuda(module, spec, feeds, b, L)
    return out


# --------------------------------------------------------------------------------------------------
# Streams mode


class StreamContext:
    """One stream's "execution context" over the shared stand-in engine: its stream, buffers and graph."""

    def __init__(self, step, events, keep=()):
        self.step = step  # enqueues one query on this context's stream
        self.events = events  # CUDA events recorded on that stream (kiln.latency.EventBackend)
        self.keep = keep  # what must live as long as the context (buffers, graph)


def parse_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; one clear error for anything else."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise SystemExit(f"--streams {text!r}: give distinct stream counts of 1 or more, e.g. 1,2,4,8")
    return sorted(counts)


def streams_sweep(counts, make_context, memory_allocated, seconds: float, batch_size: int = 1,
                  warmup_ms: float = 100.0, min_iterations: int = 50, depth: int = 2, release=lambda: None) -> dict:
    """At each count: make that many contexts (memory per context from the allocator's delta), time them
    together with kiln.streams.measure_device, drop them; images/s per count and the best count."""
    rows = []
    for n in counts:
        before = memory_allocated()
        contexts = [make_context(i) for i in range(n)]
        per_context = (memory_allocated() - before) / n
        timers = [latency.CudaEventTimer(c.events, spin_wait=True) for c in contexts]
        stats = kiln_streams.measure_device([c.step for c in contexts], timers, batch_size, warmup_ms,
                                            min_iterations, seconds, depth=depth)
        rows.append({**stats.to_dict(), "memory_per_context_bytes": round(per_context)})
        print(f"done {n} streams: {stats.images_per_s:.1f} images/s", file=sys.stderr, flush=True)
        del contexts, timers
        release()
    ips = {r["streams"]: r["images_per_s"] for r in rows}
    return {"results": rows, "images_per_s": {str(k): v for k, v in ips.items()},
            "best": kiln_streams.best(ips), "best_rule": kiln_streams.BEST_RULE}


def torch_context_factory(torch, channels: int = 64, size: int = 128, layers: int = 8, batch: int = 1):
    """make_context(i) for the stand-in engine: a shared bf16 conv stack, per context its own stream,
    input, output and CUDA graph captured on that stream."""
    nn = torch.nn
    convs = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(layers)])
    convs = convs.to("cuda", dtype=torch.bfloat16, memory_format=torch.channels_last).eval()

    def make_context(i: int) -> StreamContext:
        stream = torch.cuda.Stream()
        x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last)
        stream.wait_stream(torch.cuda.current_stream())  # x is made on the current stream
        with torch.inference_mode():
            with torch.cuda.stream(stream):  # warm-up on the capture stream (cuDNN picks its kernels)
                for _ in range(3):
                    convs(x)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y = convs(x)
        graph.replay()  # replays on the current stream: once, so the context has run before it is timed
        torch.cuda.synchronize()

        def step():
            with torch.cuda.stream(stream):
                graph.replay()

        return StreamContext(step, latency.TorchCudaEvents(stream), keep=(x, y, graph))

    name = f"conv stack {layers}x {channels}ch 3x3 {size}x{size} batch {batch} bf16, CUDA graph per context"
    return name, make_context, convs


def cuda_torch(no_torch: str, no_gpu: str):
    """torch where it sees a CUDA GPU, else None after printing the line that says which is missing."""
    try:
        import torch
    except ImportError:
        print(no_torch, file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(no_gpu, file=sys.stderr)
        return None
    return torch


def streams_main(args) -> int:
    counts = parse_counts(args.streams)
    torch = cuda_torch("streams mode needs PyTorch with CUDA: torch is not installed here",
                       "streams mode needs a CUDA GPU: torch sees none here")
    if torch is None:
        return 2
    t0 = time.perf_counter()
    info = gpu_info(torch)
    torch.backends.cudnn.benchmark = True
    name, make_context, _weights = torch_context_factory(torch)

    def release():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    sweep = streams_sweep(counts, make_context, torch.cuda.memory_allocated, args.seconds, release=release)
    result = {"gpu": info, "workload": name, "seconds_per_measurement": args.seconds, **sweep,
              "bench_seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "latency_gpu_streams.json").write_text(json.dumps(result, indent=1))
    print(streams_report(result))
    return 0


def streams_report(r: dict) -> str:
    lines = [f"Streams: {r['workload']} on {r['gpu']['name']}", "",
             "| streams | images/s | p50 ms (pooled) | p99 ms (pooled) | per stream p50 / p99 ms | MiB per context |",
             "|---|---|---|---|---|---|"]
    for row in r["results"]:
        per = ", ".join(f"{s['p50_ms']:.3f} / {s['p99_ms']:.3f}" for s in row["per_stream"])
        lines.append(f"| {row['streams']} | {row['images_per_s']:.1f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{per} | {row['memory_per_context_bytes'] / 2**20:.2f} |")
    lines += ["", f"best: {r['best']} streams ({r['best_rule']})"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--seconds", type=float, default=0.5, help="minimum timed seconds per measurement")
    ap.add_argument("--streams", help="streams mode: comma-separated stream counts, e.g. 1,2,4,8")
    args = ap.parse_args()
    if args.streams:
        return streams_main(args)
    torch = cuda_torch("bench/latency_gpu.py needs PyTorch with CUDA: torch is not installed here",
                       "no CUDA GPU visible to torch")
    if torch is None:
        return 2
    t0 = time.perf_counter()
    info = gpu_info(torch)
    peak = peak_for(info["name"])
    info["peak"] = {"matched": peak[0], "bf16_dense_tflops": peak[1] and peak[1] / 1e12,
                    "memory_tbps": peak[2] and peak[2] / 1e12}
    torch.backends.cudnn.benchmark = True
    rows = []
    for n in (1024, 2048, 4096, 8192):
        name, fn, flops, nbytes = gemm_chain(torch, n)
        rows.append(time_workload(torch, name, fn, flops, nbytes, peak, args.seconds))
        print(f"done {name}", file=sys.stderr, flush=True)
    for batch in (8, 32):
        name, fn, flops, nbytes, _ = conv_stack(torch, batch)
        rows.append(time_workload(torch, name, fn, flops, nbytes, peak, args.seconds))
        print(f"done {name}", file=sys.stderr, flush=True)

    # Phases: H2D of a batch-8 bf16 input from pinned memory, the conv stack, D2H of its output.
    _, _, flops, nbytes, convs = conv_stack(torch, 8)
    x_host = torch.randn(8, 128, 128, 128, dtype=torch.bfloat16).pin_memory()
    x_dev = torch.empty(8, 128, 128, 128, device="cuda", dtype=torch.bfloat16)
    out_host = torch.empty(8, 128, 128, 128, dtype=torch.bfloat16).pin_memory()

    def model(x):
        with torch.inference_mode():
            return convs(x.contiguous(memory_format=torch.channels_last))

    phase = phased(torch, model, x_host, out_host, args.seconds, x_dev)
    try:
        graph = graph_check(torch, 1024, 8, args.seconds)
    except Exception as err:
        graph = {"error": f"{type(err).__name__}: {err}"}
    try:
        runner = runner_check(args.seconds)
    except Exception as err:
        import traceback

        runner = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    try:
        base = baseline_check(args.seconds)
    except Exception as err:
        base = {"error": f"{type(err).__name__}: {err}"}
    result = {"gpu": info, "seconds_per_measurement": args.seconds, "rows": rows, "phases": phase, "graph": graph,
              "runner_check": runner, "baseline_check": base,
              "bench_seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "latency_gpu.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    return 0


def report(r: dict) -> str:
    g = r["gpu"]
    lines = [f"GPU: {g['name']} (cc {g['compute_capability']}), driver/CUDA {g.get('nvidia_smi')} / "
             f"{g.get('driver_cuda')}, torch {g['torch']} (CUDA {g['torch_cuda']}), cuda-bindings {g.get('cuda_bindings')}",
             "",
             "| workload | harness ms (torch events) | harness ms (cuda.bindings) | plain events ms | host+sync ms "
             "| floor ms | harness/plain | floor/plain |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        h = row["harness"]["median_ms"]
        cb = row["harness_cb"].get("median_ms")
        p = row["plain_ms"]["median"]
        f = row.get("floor_ms")
        lines.append(f"| {row['workload']} | {h:.4f} | {cb if cb is None else f'{cb:.4f}'} | {p:.4f} | "
                     f"{row['host_sync']['median_ms']:.4f} | {f if f is None else f'{f:.4f}'} | "
                     f"{100 * h / p:.1f}% | {'' if f is None else f'{100 * f / p:.1f}%'} |")
    ph = r["phases"]["harness"]
    lines += ["", "Phases (batch-8 conv stack with H2D/D2H, cuda.bindings events), medians ms: "
              + ", ".join(f"{k} {v['median_ms']:.4f}" for k, v in ph["phases"].items())
              + f"; latency {ph['median_ms']:.4f}; plain events around the forward alone {r['phases']['plain_forward_ms']:.4f}"]
    gr = r["graph"]
    if gr.get("captured"):
        lines.append(f"CUDA graph (capture_graph): replay matches eager: {gr['replay_matches_eager']}; graph "
                     f"{gr['graph']['median_ms']:.4f} ms vs eager {gr['eager']['median_ms']:.4f} ms (harness), "
                     f"plain events on the graph {gr['plain_graph_ms']:.4f} ms")
    else:
        lines.append(f"CUDA graph check: {gr}")
    rc = r.get("runner_check", {})
    if "error" in rc:
        lines.append(f"Runner check failed: {rc['error']}\n{rc.get('traceback', '')}")
    elif rc:
        q = rc["query"]
        lines.append(f"Runner check (stand-in engine): results {rc['checks']}, profiles switched to "
                     f"{rc['profiles_switched_to']}, CUDA graph: {rc['cuda_graph']}; query at batch 8: latency "
                     f"{q['median_ms']:.4f} ms, " + ", ".join(f"{k} {v['median_ms']:.4f}" for k, v in q["phases"].items()))
    bc = r.get("baseline_check", {})
    if bc:
        lines.append("Baseline check (kiln.baseline.measure_cuda, demo YOLO, random weights): " + (
            bc["error"] if "error" in bc else "; ".join(
                f"{k}: latency {v['median_ms']:.4f} ms, " + ", ".join(f"{p} {q['median_ms']:.4f}"
                                                                       for p, q in v["phases"].items())
                for k, v in bc.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
