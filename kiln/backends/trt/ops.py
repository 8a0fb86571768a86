"""What each TensorRT (and TensorRT-RTX) ONNX parser accepts, as data: opsets, ops, and the rewrites.

One table answers three questions the rest of Kiln asks:

* the highest ONNX opset a parser version documents (:func:`parser_max_opset`; config check);
* which ops a version's parser lacks and what rewrites them (:func:`unsupported`,
  :func:`required_passes`; the ``surgery`` stage applies the rewrites a device needs);
* what to tell the user when a parser rejects a node (:func:`hint`; the build error and the
  ``diagnose`` stage).

Versions are ``(major, minor)`` of the runtime the device names: TensorRT for backend
``tensorrt``, TensorRT-RTX for backend ``tensorrt-rtx`` (which has its own version line). A
version uses the entry of the largest key ``<=`` itself.

Sources, per entry below: the ``docs/operators.md`` of onnx-tensorrt's release branches (8.4, 8.5-GA),
TensorRT's release notes, and, for TensorRT-RTX, what its parser did on this project's hosts
(``measured``), since its documentation lists no per-op matrix. Entries not marked ``measured``
were not run here: no TensorRT (non-RTX) wheel can be installed on a CPU-only host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Version = tuple[int, int]

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
LABELS = {TENSORRT: "TensorRT", TENSORRT_RTX: "TensorRT-RTX"}

# Highest ONNX opset each parser documents, keyed by the first version that documented it. TensorRT 8.5:
# opset 17, but no LayerNormalization op (OP_RULES; stated once for users in docs/models.md, "What
# TensorRT 8.5's parser takes").
# tensorrt: onnx-tensorrt docs/operators.md per release branch ("TensorRT 8.5/8.6 supports operators up to
# Opset 17", "TensorRT 10.0 ... opset 9 to opset 20", "TensorRT 10.15 ... opset 9 to opset 24") and the
# TensorRT 11.x ONNX Opset Guide ("Maximum opset 25"); releases between 10.0 and 10.15 are held to 20, the
# last value documented for them.
# tensorrt-rtx: measured with 1.7.1.116 (a model at opset 25, the highest onnx 1.23 writes, parsed);
# earlier releases are not known here, so no limit is checked for them.
PARSER_MAX_OPSET: dict[str, dict[Version, int]] = {
    TENSORRT: {(8, 5): 17, (8, 6): 17, (10, 0): 20, (10, 15): 24, (11, 0): 25},
    TENSORRT_RTX: {(1, 7): 25},
}

# The oldest TensorRT Kiln's tensorrt backend builds for (kiln/backends/tensorrt.py SUPPORTED).
OLDEST = {TENSORRT: (8, 5), TENSORRT_RTX: (1, 0)}


@dataclass(frozen=True)
class OpRule:
    """One ONNX op (or TensorRT plugin op) whose support depends on the parser version.

    ``since`` maps a flavor to the first version whose parser takes the op, or None when no
    version of that flavor does. ``onnx_opset`` is the first ONNX opset that has the op (an
    export below it cannot contain it). ``rewrite`` names the surgery pass that removes the op
    numerically unchanged; ``advice`` is the other fix, in words.
    """

    op_type: str
    since: dict[str, Version | None]
    onnx_opset: int = 1
    domain: str = ""
    rewrite: str | None = None
    advice: str = ""
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


OP_RULES: tuple[OpRule, ...] = (
    OpRule(
        "LayerNormalization",
        since={TENSORRT: (8, 6), TENSORRT_RTX: (1, 0)},
        onnx_opset=17,
        rewrite="decompose_layernorm",
        advice="export at opset 16",  # PyTorch then writes LayerNorm as primitive ops
        source="onnx-tensorrt 8.5-GA operators.md: LayerNormalization N; TensorRT 8.6 release notes add "
               "INormalizationLayer and its ONNX import; TensorRT-RTX 1.7.1.116: measured, parses",
    ),
    OpRule(
        "GridSample",
        since={TENSORRT: (8, 5), TENSORRT_RTX: (1, 0)},
        onnx_opset=16,
        advice="build this model for TensorRT 8.5 or newer (no rewrite: GridSample has no cheap decomposition)",
        source="onnx-tensorrt 8.4 operators.md: absent; 8.5-GA: GridSample Y (FP32, FP16); "
               "TensorRT-RTX 1.7.1.116: measured, parses",
    ),
    OpRule(
        "Mod",
        since={TENSORRT: (8, 5), TENSORRT_RTX: (1, 0)},
        onnx_opset=10,
        rewrite="replace_mod",
        advice="write a - (a // b) * b in the model instead of a % b",
        source="onnx-tensorrt 8.4 operators.md: Mod N; 8.5-GA: Mod Y (FP32, FP16, INT32); "
               "TensorRT-RTX 1.7.1.116: measured, parses (int64)",
        notes=("RT-DETR's postprocessor writes index % num_classes; DLA runs no Mod on any version",),
    ),
    OpRule(
        "NonMaxSuppression",
        since={TENSORRT: (8, 5), TENSORRT_RTX: None},
        onnx_opset=10,
        advice="set nms: none for this model (Kiln then decodes and runs NMS on the host)",
        source="onnx-tensorrt 8.4 operators.md: Y [EXPERIMENTAL]; 8.5-GA: Y (FP32, FP16); TensorRT-RTX "
               "1.7.1.116: measured, the parser takes it but the ahead-of-time build (compute capability 8.9) "
               "fails: 'NonMaxSuppression has no runners that implement it'",
    ),
    OpRule(
        "EfficientNMS_TRT",
        since={TENSORRT: (8, 0), TENSORRT_RTX: None},
        onnx_opset=1,
        advice="use nms: onnx (the ONNX NonMaxSuppression op; TensorRT only) or nms: none",
        source="TensorRT plugin library (libnvinfer_plugin) since 8.0; TensorRT-RTX ships no plugin library: "
               "measured with 1.7.1.116, 'Plugin not found'",
    ),
    OpRule(
        "Det",
        since={TENSORRT: None, TENSORRT_RTX: None},
        onnx_opset=11,
        advice="compute the determinant outside the engine",
        source="onnx-tensorrt 8.5-GA operators.md: Det N; TensorRT-RTX 1.7.1.116: measured, UNSUPPORTED_NODE",
    ),
)

RULES_BY_OP = {r.op_type: r for r in OP_RULES}


# --------------------------------------------------------------------------------------------------
# Versions


def version_of(text: str | tuple | None) -> Version | None:
    """'10.13.0.35' or (10, 13) -> (10, 13); None for None or text without digits."""
    if text is None:
        return None
    if isinstance(text, tuple):
        return (int(text[0]), int(text[1]) if len(text) > 1 else 0)
    parts = [int(p) for p in re.findall(r"\d+", str(text))]
    if not parts:
        return None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def label(flavor: str, version: str | tuple | None = None) -> str:
    v = version_of(version)
    return LABELS[flavor] + (f" {v[0]}.{v[1]}" if v else "")


def parser_max_opset(flavor: str, version: str | tuple | None) -> int | None:
    """Highest opset the parser of this version documents (None when unknown, e.g. TensorRT < 8.5)."""
    v = version_of(version)
    table = PARSER_MAX_OPSET[flavor]
    known = [k for k in table if v is not None and k <= v]
    return table[max(known)] if known else None


def supports(flavor: str, version: str | tuple | None, op_type: str) -> bool | None:
    """Whether this parser version takes ``op_type``: True/False from the table, None when it has no entry."""
    rule = RULES_BY_OP.get(op_type)
    if rule is None:
        return None
    since = rule.since.get(flavor)
    v = version_of(version)
    if since is None:
        return False
    return v is not None and v >= since


def unsupported(flavor: str, version: str | tuple | None, op_types) -> list[str]:
    """The op types among ``op_types`` that the table says this parser version rejects, in table order."""
    present = set(op_types)
    return [r.op_type for r in OP_RULES if r.op_type in present and supports(flavor, version, r.op_type) is False]


def required_passes(flavor: str, version: str | tuple | None, opset: int) -> list[str]:
    """Surgery passes a device on this parser version needs for a model exported at ``opset``.

    A pass is required when its op can appear at this opset (the op exists in ONNX from
    ``onnx_opset``) and this version's parser does not take it. Passes are numerically neutral
    rewrites, so applying them where they are not needed changes no result.
    """
    out = []
    for r in OP_RULES:
        if r.rewrite and opset >= r.onnx_opset and supports(flavor, version, r.op_type) is False:
            out.append(r.rewrite)
    return out


def hint(flavor: str, version: str | tuple | None, op_type: str, node: str = "", opset: int | None = None) -> str:
    """One line saying why a node fails on this parser and how to fix it, e.g.

    "LayerNormalization at /encoder/ln_3 is not supported by TensorRT 8.5: export at opset 16 or
    enable decompose_layernorm".
    """
    where = f"{op_type} at {node}" if node else op_type
    who = label(flavor, version)
    rule = RULES_BY_OP.get(op_type)
    if rule is None:
        return (f"{where} is rejected by {who}, which Kiln's op table (kiln/backends/trt/ops.py) does not list: replace it "
                f"in the model or with a surgery pass, or build this model for another device")
    fixes = []
    if rule.advice and not (rule.op_type == "LayerNormalization" and opset is not None and opset < 17):
        fixes.append(rule.advice)
    if rule.rewrite:
        fixes.append(f"enable {rule.rewrite}")
    if supports(flavor, version, op_type) is False:
        since = rule.since.get(flavor)
        why = f"is not supported by {who}" + (f" (from {label(flavor, since)} on)" if since else "")
    else:
        why = f"failed on {who}, whose parser should take it (check the node's attributes, types and shapes)"
    return f"{where} {why}: " + " or ".join(fixes) if fixes else f"{where} {why}"


def model_problems(flavor: str, version: str | tuple | None, nms: str) -> list[str]:
    """Config-time problems of a model's graph additions on a parser version (nms: the op it appends)."""
    op = {"onnx": "NonMaxSuppression", "efficient": "EfficientNMS_TRT"}.get(nms)
    if op is None or supports(flavor, version or OLDEST[flavor], op) is not False:
        return []
    return [f"nms: {nms} appends {op}, which {label(flavor, version)} cannot build ({RULES_BY_OP[op].source.split('; ')[-1]}): "
            f"{RULES_BY_OP[op].advice}, or leave this model out of the device's 'models'"]
