"""Stage `baseline`: the checkpoint in PyTorch eager on the device, timed like its engines.

The same model factory and weights as the export, the same validation inputs, the same harness
(kiln.latency) and timer as validation on that device: the host clock for CPU devices
(with PyTorch's intra-op threads set to the device's ONNX Runtime thread count), CUDA events with
H2D and D2H copies for GPU devices. The summary's ``speedup_vs_pytorch`` is this median latency
over the engine's, at batch 1.

The result is written even when the baseline cannot run (no CUDA in this host's PyTorch, say),
with status "failed" and the reason, so validation and the summary carry on without a speedup.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np

from kiln import latency, paths
from kiln.batches import load as load_inputs
from kiln.specs import KilnConfig
from kiln.util import disk_error, write_json

log = logging.getLogger(__name__)


def torch_device(cfg: KilnConfig, device: str) -> str:
    """Where PyTorch runs for a device: on its GPU, or the CPU for a CPU device (the backend says)."""
    from kiln import backends

    d = cfg.devices[device]
    return backends.get(d.backend).baseline_torch_device(d)


def params(cfg: KilnConfig, device: str, model: str) -> dict:
    """Everything that changes a baseline measurement (tracked by Snakemake)."""
    from kiln import sources

    d = cfg.devices[device]
    return {
        "model": sources.model_params(cfg.models[model]),
        "torch_device": torch_device(cfg, device),
        "batch_sizes": batch_sizes(cfg, device),
        "threads": d.threads,
        "latency": cfg.validation["latency"],
    }


def batch_sizes(cfg: KilnConfig, device: str) -> list[int]:
    """The device's batch sizes, always with batch 1 (the speedup is taken there)."""
    return sorted({1, *cfg.devices[device].batch_sizes})


def targets(cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list[str]:
    """Baseline files of every device x model this host can validate."""
    return sorted({
        paths.fmt(paths.BASELINE, results=cfg.results, device=dev, model=m)
        for dev, m, _ in cfg.jobs()
        if run[dev] is None and build[dev] is None
    })


def _tensors(torch, feeds: dict[str, np.ndarray], names) -> list:
    return [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def measure_cpu(module, spec, feeds: dict[str, np.ndarray], batch: int, L: dict) -> dict:
    import torch

    from kiln import latency

    args = _tensors(torch, feeds, spec.input_names)

    def step():
        with torch.inference_mode():
            module(*args)

    return latency.measure(step, batch, L["warmup_ms"], L["min_iterations"], L["min_seconds"],
                           L["cv_warn_percent"]).to_dict()


def measure_cuda(module, spec, feeds: dict[str, np.ndarray], batch: int, L: dict) -> dict:
    """H2D copies from pinned memory, forward, D2H copies into pinned memory, timed with CUDA events."""
    import torch

    from kiln import latency

    host = [t.pin_memory() for t in _tensors(torch, feeds, spec.input_names)]
    dev = [torch.empty_like(t, device="cuda") for t in host]
    for h, d in zip(host, dev):
        d.copy_(h)
    with torch.inference_mode():
        outs = _as_tuple(module(*dev))
    out_host = [torch.empty(o.shape, dtype=o.dtype).pin_memory() for o in outs]
    timer = latency.CudaEventTimer(latency.TorchCudaEvents(torch.cuda.current_stream()), spin_wait=True)

    def step():
        for h, d in zip(host, dev):
            d.copy_(h, non_blocking=True)
        timer.mark("h2d")
        with torch.inference_mode():
            outs = _as_tuple(module(*dev))
        timer.mark("compute")
        for o, h in zip(outs, out_host):
            h.copy_(o, non_blocking=True)
        timer.mark("d2h")

    return latency.measure(step, batch, L["warmup_ms"], L["min_iterations"], L["min_seconds"],
                           L["cv_warn_percent"], timer=timer, depth=2).to_dict()


def run_baseline(cfg: KilnConfig, device: str, model: str, inputs_npz: str | Path, out: str | Path,
                 threads: int = 0) -> dict:
    """Time the eager checkpoint at each batch size and write `out`."""
    spec = cfg.models[model]
    d = cfg.devices[device]
    L = cfg.validation["latency"]
    where = torch_device(cfg, device)
    record: dict = {"device": device, "model": model, "torch_device": where, "host": platform.node(),
                    "checkpoint": spec.checkpoint}
    try:
        import torch

        from kiln.sources import build_module

        record["torch"] = torch.__version__
        if where == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"PyTorch {torch.__version__} on this host has no CUDA device")
        n_threads = d.threads or threads
        if where == "cpu" and n_threads:
            torch.set_num_threads(int(n_threads))
        record["threads"] = torch.get_num_threads()
        module = build_module(spec)
        if where == "cuda":
            torch.backends.cudnn.benchmark = True
            module = module.to("cuda")
            record["gpu"] = torch.cuda.get_device_name(0)
        inputs = load_inputs(inputs_npz)
        lat = []
        for bs in batch_sizes(cfg, device):
            if not spec.dynamic_batch and bs != 1:
                continue
            feeds = inputs.feeds(spec, 0, bs) if bs <= len(inputs) else {
                k: np.repeat(v[:1], bs, axis=0) for k, v in inputs.feeds(spec, 0, 1).items()}
            log.info("baseline %s/%s: PyTorch eager on %s at batch %d", device, model, where, bs)
            stats = (measure_cuda if where == "cuda" else measure_cpu)(module, spec, feeds, bs, L)
            if stats.get("warning"):
                log.warning("baseline batch %d: %s", bs, stats["warning"])
            lat.append(stats)
        record.update(status="measured", reason=None, latency=lat)
        log.info("baseline %s/%s: p50 %.2f ms at batch 1", device, model, latency.median_at(record) or float("nan"))
    except Exception as err:  # the engine's validation must not depend on PyTorch running here
        if disk_error(err) is not None:
            raise  # a full disk is not PyTorch failing: the entry point says so in one line
        log.warning("baseline %s/%s could not run: %s", device, model, err)
        record.update(status="failed", reason=f"{type(err).__name__}: {err}".replace("\n", " "), latency=[])
    write_json(out, record)
    return record


def run_rule(cfg, job) -> None:
    """Rule `baseline`: the checkpoint in PyTorch eager on the device, timed like its engines."""
    w = job.wildcards
    run_baseline(cfg, w.device, w.model, job.input.inputs, job.output[0], threads=job.threads)
