"""Stage `surgery`: onnx-graphsurgeon passes chosen per model in config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from kiln.util import atomic_path, write_json

log = logging.getLogger(__name__)

# Nodes that only matter in training; at inference they are identities.
TRAINING_ONLY_OPS = ("Dropout", "Identity")


def params(cfg, model: str) -> dict:
    return {"surgery": list(cfg.models[model].surgery)}


def _remove_training_nodes(graph) -> None:
    """Bypass Dropout/Identity nodes, keeping graph outputs' names intact."""
    for node in list(graph.nodes):
        if node.op not in TRAINING_ONLY_OPS or not node.inputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if out in graph.outputs:
            # The graph output keeps its name: rewire the producer of src instead.
            if not src.inputs or src in graph.inputs:
                continue
            producer = src.inputs[0]
            producer.outputs = [out if t is src else t for t in producer.outputs]
            for consumer in list(src.outputs):
                if consumer is not node:
                    consumer.inputs = [out if t is src else t for t in consumer.inputs]
        else:
            for consumer in list(out.outputs):
                consumer.inputs = [src if t is out else t for t in consumer.inputs]
        node.outputs.clear()
        node.inputs.clear()
    graph.cleanup()


def _fold_constants(graph) -> None:
    graph.fold_constants()


def _cleanup(graph) -> None:
    graph.cleanup().toposort()


PASSES: dict[str, Callable] = {
    "remove_training_nodes": _remove_training_nodes,
    "fold_constants": _fold_constants,
    "cleanup": _cleanup,
}


def run_passes(src: str | Path, dst: str | Path, record: str | Path, passes: list[str]) -> dict:
    """Apply `passes` in order to `src`, write `dst` and a record of node counts per pass."""
    import onnx
    import onnx_graphsurgeon as gs

    model = onnx.load(str(src))
    opset = model.opset_import
    graph = gs.import_onnx(model)
    steps = [{"pass": "input", "nodes": len(graph.nodes)}]
    for name in passes:
        if name == "infer_shapes":
            continue  # runs on the exported proto below
        PASSES[name](graph)
        steps.append({"pass": name, "nodes": len(graph.nodes)})
        log.info("surgery %s: %d nodes", name, len(graph.nodes))
    out = gs.export_onnx(graph)
    # graphsurgeon may renumber the default opset import; keep the exported one exactly.
    del out.opset_import[:]
    out.opset_import.extend(opset)
    out.ir_version = model.ir_version
    if "infer_shapes" in passes:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=True)
        steps.append({"pass": "infer_shapes", "value_infos": len(out.graph.value_info)})
    onnx.checker.check_model(out)
    with atomic_path(dst) as tmp:
        onnx.save(out, str(tmp))
    info = {"tool": f"onnx-graphsurgeon {gs.__version__}", "passes": steps}
    write_json(record, info)
    return info
