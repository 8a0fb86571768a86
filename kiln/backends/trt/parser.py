"""Parsing an ONNX file into a TensorRT network, with every parser refusal named by node and op."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.backends.trt import ops as trt_ops
from kiln.backends.trt.importer import LABELS
from kiln.errors import KilnError


def _call(obj: Any, name: str) -> Any:
    """obj.name() when the binding has it (IParserError gained node_name/node_operator after 8.5)."""
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:
        return None


def parser_error_text(err: Any, nodes: Sequence[Any] = ()) -> str:
    """One parser error as 'node 3 'name' (op Domain:Type): description [CODE]'."""
    index = _call(err, "node")
    index = int(index) if isinstance(index, int) else -1
    node = nodes[index] if 0 <= index < len(nodes) else None
    name = _call(err, "node_name") or (node.name if node is not None else "")
    op = _call(err, "node_operator") or (node.op_type if node is not None else "")
    if node is not None and node.domain not in ("", "ai.onnx") and node.op_type == op:
        op = f"{node.domain}:{op}"
    code = _call(err, "code")
    code = getattr(code, "name", None) or (str(code) if code is not None else "")
    desc = str(_call(err, "desc") or err).strip()
    where = f"node {index} '{name}' (op {op})" if index >= 0 else "the graph"
    return f"{where}: {desc}" + (f" [{code}]" if code else "")


def parse_onnx(ns: SimpleNamespace, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """Parse an ONNX file into a new network; every parser error ends up in the KilnError.

    Polygraphy's ``network_from_onnx_path`` would do the same parse, but on failure it only logs
    the errors and raises "Could not parse ONNX correctly"; Kiln's summary needs each failing
    node's name, op type and the parser's reason, so the parser is driven here, on a network
    from Polygraphy's ``create_network`` (which knows which creation flags this version takes).
    """
    import onnx

    trt = ns.trt
    builder, network = ns.pg.create_network(strongly_typed=strongly_typed)
    logger = ns.util.get_trt_logger()
    trt.init_libnvinfer_plugins(logger, "")  # as Polygraphy's ONNX loader does: plugin ops resolve
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if ok and parser.num_errors == 0:
        return builder, network, parser
    proto = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(proto.graph.node)
    errors = [parser_error_text(parser.get_error(i), nodes) for i in range(parser.num_errors)]
    raise KilnError(
        f"{LABELS[ns.flavor]} {trt.__version__} cannot parse '{onnx_path}': "
        + "; ".join(errors or ["the parser gave no reason (is the file a valid ONNX model?)"])
        + ": " + (parse_hints(ns.flavor, trt.__version__, parser, proto)
                  or "replace or remove these nodes (export, surgery) or build this model for another device")
    )


def parse_hints(flavor: str, version: str, parser: Any, proto: Any) -> str:
    """Kiln's op table's advice (kiln/backends/trt/ops.py) for the failing nodes it knows, '; '-joined ('' if none)."""
    nodes = list(proto.graph.node)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    out: dict[str, None] = {}
    for i in range(parser.num_errors):
        index = _call(parser.get_error(i), "node")
        node = nodes[index] if isinstance(index, int) and 0 <= index < len(nodes) else None
        if node is not None and node.op_type in trt_ops.RULES_BY_OP:
            out[trt_ops.hint(flavor, version, node.op_type, node.name, opset)] = None
    return "; ".join(out)
