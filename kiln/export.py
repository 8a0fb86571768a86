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


def stated_classes(spec: ModelSpec, meta: dict[str, str]) -> list[tuple[int, str]]:
    """The class counts the config, the checkpoint and the model's names state: (count, where), maybe none."""
    import ast

    from kiln import sources

    stated = []
    found = sources.num_classes(spec)
    if found is not None:
        stated.append(found)
    if meta.get("names"):
        stated.append((len(ast.literal_eval(meta["names"])), f"the model's names ({meta['names'][:60]})"))
    return stated


def _classes_fix(spec: ModelSpec, where: str, graph: int) -> str:
    if where.startswith("the model's names"):
        return f"give the model (its 'names') one name per class, {graph}"
    if "factory_args" in where:
        key = where.strip("'").rsplit(".", 1)[-1]
        return (f"set 'models.{spec.name}.factory_args.{key}: {graph}' if the model has {graph} classes, or make the "
                f"factory build the head it is given")
    if spec.source == "ultralytics" and spec.ultralytics_yaml:
        return f"set 'models.{spec.name}.factory_args.nc: {graph}' or fix 'nc' in '{spec.ultralytics_yaml}'"
    return (f"the exported output is not the head the count was read from: check that the factory's forward() gives "
            f"layout {spec.layout} (docs/models.md, layouts) and 'models.{spec.name}.layout'")


def check_classes(spec: ModelSpec, model, meta: dict[str, str], out: str | Path) -> dict:
    """The class count the exported graph implies, checked against what the config or checkpoint states.

    A disagreement is refused (the export leaves no ONNX). Otherwise the count goes into the ONNX's
    metadata (kiln.classes.COUNT_KEY) with how it was read (FROM_KEY): from the graph, and whether the
    config or checkpoint stated it; a count the graph does not show (a symbolic dimension) is not guessed.
    Returns ``{"metadata": ..., "record": ...}``.
    """
    from kiln import classes

    graph = classes.graph_classes(model, spec.layout)
    stated = stated_classes(spec, meta)
    for count, where in stated:
        if graph.count is not None and count != graph.count:
            raise KilnError(
                f"export of 'models.{spec.name}' to '{out}': the exported graph has {graph.count} classes "
                f"({graph.how}) but {where} states {count}: {_classes_fix(spec, where, graph.count)}"
            )
    counts = sorted({c for c, _ in stated})
    if graph.count is not None:
        count = graph.count
        how = f"{graph.how}; {'as the config or checkpoint states' if stated else 'stated nowhere else: derived'}"
    elif len(counts) == 1:
        count, how = counts[0], f"stated by the config or checkpoint; not readable from the graph: {graph.how}"
    else:
        count, how = None, f"unknown: {graph.how}"
    if count is None:
        log.warning("export %s: class count unknown (%s)", spec.name, graph.how)
    else:
        log.info("export %s: %d classes (%s)", spec.name, count, how)
    record = {"count": count, "how": how, "stated": [{"count": c, "where": w} for c, w in stated]}
    meta = {classes.FROM_KEY: how, **({classes.COUNT_KEY: str(count)} if count is not None else {})}
    return {"metadata": meta, "record": record}


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
        meta = metadata(spec, module)
        found = check_classes(spec, model, meta, out)
        meta = {**meta, **found["metadata"]}
        for key, value in sorted(meta.items()):
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
    log.info("export %s: %d nodes written to %s", spec.name, len(model.graph.node), out)
    return {"nodes": len(model.graph.node), "opset": opset, "metadata": meta, "classes": found["record"]}


def run_rule(cfg, job) -> None:
    """Rule `export`: the model to ONNX at one opset."""
    export_onnx(cfg.models[job.wildcards.model], int(job.wildcards.opset), job.output[0])
