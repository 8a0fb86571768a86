"""Stage `export`: a model from its source (kiln/sources/) to ONNX at one opset, checked, byte-reproducible.

The bytes are the same on every x86 CPU, not only on the one that wrote kiln.lock: constant folding
runs on torch's CPU-independent kernels (kiln.numerics) and one thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.errors import KilnError
from kiln.numerics import cpu_independent_torch
from kiln.specs import KilnConfig, ModelSpec
from kiln.util import atomic_path

log = logging.getLogger(__name__)


def params(cfg: KilnConfig, model: str) -> dict:
    """Everything in the config that changes the exported bytes (tracked by Snakemake)."""
    from kiln import sources

    return sources.model_params(cfg.models[model])


def build_module(spec: ModelSpec):
    """The model of ``spec`` from its source (kiln/sources/), in eval mode, ready to trace."""
    from kiln import sources

    return sources.build_module(spec)


def example_inputs(spec: ModelSpec, batch: int = 1) -> tuple:
    """Deterministic example inputs for tracing: the values do not matter, the shapes and dtypes do."""
    import torch

    h, w = spec.input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen)
    if spec.layout == "rtdetr":
        return images, torch.tensor([[w, h]] * batch, dtype=torch.int64)
    return (images,)


def dynamic_axes(spec: ModelSpec) -> dict:
    axes: dict[str, dict[int, str]] = {}
    img = {}
    if spec.dynamic_batch:
        img[0] = "batch"
    if spec.dynamic_hw:
        img[2], img[3] = "height", "width"
    if img:
        axes["images"] = img
    if spec.dynamic_batch:
        for name in spec.input_names[1:] + spec.head_output_names:
            axes[name] = {0: "batch"}
    return axes


def export_onnx(spec: ModelSpec, opset: int, out: str | Path) -> dict:
    """Export `spec` at `opset` to `out`; returns a record of what was exported."""
    with cpu_independent_torch() as pinned:
        if not pinned:
            log.warning("export %s: torch kernels ran in this process before export, so its folded constants "
                        "may depend on this CPU (the export script imports torch only inside export)", spec.name)
        record = _export(spec, opset, out)
    return {**record, "cpu_independent": pinned}


def metadata(spec: ModelSpec, module) -> dict[str, str]:
    """The ONNX's metadata_props, as Ultralytics' exporter writes them: each value ``str()`` of a Python literal.

    task, imgsz ([h, w]) and Kiln's layout always; stride and class names where the source knows them
    (an Ultralytics checkpoint: its ``model.names``; a torch factory's module: its ``stride`` and
    ``names`` attributes, if it has them). Nothing that varies between two exports of the same model
    (no date, path or version), so the bytes stay reproducible.
    """
    known = dict(getattr(module, "kiln_metadata", None) or {})
    for key in ("stride", "names"):
        if key not in known and getattr(module, key, None) is not None:
            known[key] = getattr(module, key)
    if isinstance(known.get("stride"), (list, tuple)) or hasattr(known.get("stride"), "tolist"):
        stride = known["stride"]
        known["stride"] = int(max(stride.tolist() if hasattr(stride, "tolist") else stride))
    if isinstance(known.get("names"), (list, tuple)):
        known["names"] = dict(enumerate(known["names"]))
    out = {"task": known.get("task", "detect"), "imgsz": [int(v) for v in spec.input_size], "layout": spec.layout}
    if known.get("stride") is not None:
        out["stride"] = int(known["stride"])
    if known.get("names"):
        out["names"] = {int(k): str(v) for k, v in known["names"].items()}
    return {k: str(v) for k, v in sorted(out.items())}


def _export(spec: ModelSpec, opset: int, out: str | Path) -> dict:
    import onnx
    import torch

    log.info("export %s at opset %d: loading %s", spec.name, opset, spec.checkpoint)
    module = build_module(spec)
    args = example_inputs(spec)
    with atomic_path(out) as tmp:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=list(spec.input_names),
                output_names=list(spec.head_output_names),
                dynamic_axes=dynamic_axes(spec),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter gives stable bytes and honours opset exactly
            )
        model = onnx.load(str(tmp))
        meta = metadata(spec, module)
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise KilnError(f"export of '{spec.name}' at opset {opset} failed onnx.checker: {err}") from None
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != list(spec.input_names) or got_out != list(spec.head_output_names):
            raise KilnError(
                f"model '{spec.name}' (layout {spec.layout}) exported inputs {got_in} and outputs {got_out}; "
                f"layout {spec.layout} needs {list(spec.input_names)} -> {list(spec.head_output_names)}: "
                f"check 'models.{spec.name}.layout' and the factory's forward()"
            )
    log.info("export %s: %d nodes written to %s", spec.name, len(model.graph.node), out)
    return {"nodes": len(model.graph.node), "opset": opset, "metadata": meta}


def run_rule(cfg, job) -> None:
    """Rule `export`: the model to ONNX at one opset."""
    export_onnx(cfg.models[job.wildcards.model], int(job.wildcards.opset), job.output[0])
