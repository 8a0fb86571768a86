"""layers.json: the engine's layers from the engine inspector, or the parsed network's where it cannot run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.backends.trt.host import _probe_gpu
from kiln.backends.trt.importer import LABELS

log = logging.getLogger(__name__)


def network_layers(network: Any) -> list[dict[str, Any]]:
    """Layers of a parsed network: name, type and each output's name, dtype and shape."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outputs.append({"name": t.name, "dtype": getattr(t.dtype, "name", str(t.dtype)),
                            "shape": [int(d) for d in t.shape]})
        layers.append({"index": i, "name": layer.name, "type": getattr(layer.type, "name", str(layer.type)),
                       "outputs": outputs})
    return layers


def inspector_layers(ns: SimpleNamespace, plan: Any) -> dict[str, Any] | None:
    """The engine inspector's JSON of the built plan, or None when this host cannot deserialize it.

    Deserializing needs a CUDA driver (and for TensorRT-RTX a GPU of a target compute
    capability), so it is only tried where the host probe found a driver.
    """
    if not _probe_gpu().get("driver"):
        return None
    trt = ns.trt
    try:
        runtime = trt.Runtime(ns.util.get_trt_logger())
        engine = runtime.deserialize_cuda_engine(bytes(memoryview(plan)))
        if engine is None:
            return None
        inspector = engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as err:  # a runtime refusal is a reason to fall back, not to fail the build
        log.info("engine inspector unavailable (%s); layers.json lists the parsed network", err)
        return None


def write_layers_json(path: Path, ns: SimpleNamespace, network: Any, plan: Any, strongly_typed: bool) -> dict[str, Any]:
    """Write layers.json, from the engine inspector when possible, else from the parsed network."""
    from kiln.util import write_json

    info = inspector_layers(ns, plan)
    builder = f"{LABELS[ns.flavor]} {ns.trt.__version__}"
    if info is not None:
        layers = info.get("Layers", [])
        doc = {"source": "engine_inspector", "builder": builder, "num_layers": len(layers), "layers": layers,
               "engine": {k: v for k, v in info.items() if k != "Layers"}}
    else:
        layers = network_layers(network)
        doc = {
            "source": "network",
            "builder": builder,
            "note": (
                "layers of the parsed network before TensorRT's fusions and kernel choice: the engine "
                "inspector needs the engine deserialized, which needs a CUDA driver"
                + (" and a GPU of a target compute capability" if ns.flavor == "tensorrt-rtx" else "")
                + ("" if strongly_typed else "; a weakly typed network's dtypes are those parsed, not the "
                   "precisions the builder picks under its flags")
            ),
            "strongly_typed": strongly_typed,
            "num_layers": len(layers),
            "layers": layers,
        }
    write_json(path, doc)
    return doc
