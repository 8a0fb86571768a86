"""Precision variants of an fp32 ONNX model for strongly typed targets (TensorRT, ONNX Runtime).

One fp32 ONNX export becomes one variant per precision:

* ``fp32``: the bytes of the export, copied.
* ``fp16`` / ``bf16``: ModelOpt AutoCast (``convert_to_mixed_precision``). Nodes whose reference
  activations exceed +-512 (where fp16's step is already 0.5) stay fp32, Cast nodes are inserted at
  the borders, graph IO stays fp32 (``keep_io_types``). bf16 needs opset 22; AutoCast raises it.
* ``int8`` / ``fp8``: ModelOpt ONNX PTQ (``modelopt.onnx.quantization.quantize``) with calibration on
  the ONNX Runtime CPU provider, giving explicit QuantizeLinear/DequantizeLinear pairs (opset >= 19),
  then AutoCast to fp16 for everything that is not quantized (see ``HIGH_PRECISION_DTYPE``).

Strongly typed TensorRT builds take every tensor type from the ONNX, so the variant *is* the
precision decision; nothing is left to builder flags.

Which of these ONNX Runtime can execute on this host is asked of the runtime itself
(``kiln.backends.ort_capabilities``), not kept in a table here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kiln.errors import KilnError
from kiln.util import atomic_path, scratch_dir, write_json

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
LOW_PRECISIONS = ("fp16", "bf16")
QUANT_PRECISIONS = ("int8", "fp8")

# ModelOpt's int8/fp8 PTQ knows exactly two calibration methods: "entropy" (ORT's KL-divergence
# histogram calibrator) and "max" (ORT MinMax with symmetric activations, i.e. absmax). Its int8.py
# and fp8.py test `calibration_method == "entropy"` and treat ANY other string as MinMax, so a typo
# would silently become "max": we validate before calling it.
CALIB_METHODS = ("entropy", "max")

# Non-quantized parts of an int8/fp8 variant run in this dtype. fp16 is ModelOpt's default and what a
# strongly typed TensorRT engine wants (int8/fp8 kernels where Q/DQ says so, fp16 elsewhere); fp32
# there would make TensorRT run every non-quantized layer in fp32.
HIGH_PRECISION_DTYPE = "fp16"

# AutoCast runs the fp32 model once in ONNX Runtime to find activations outside the fp16 range. It keeps
# every intermediate tensor of every sample in memory, so a few samples are enough and bound the cost.
AUTOCAST_REFERENCE_SAMPLES = 4

# Ops that only move or reshape data. Walking back from a graph output through these reaches the
# Sigmoid that produced the scores (e.g. YOLO's Concat(boxes, cls.sigmoid()) -> Transpose -> output).
# Value: which inputs carry the data (None = all), so we do not wander into index/shape inputs.
_DATA_MOVEMENT_OPS: dict[str, tuple[int, ...] | None] = {
    "Concat": None,
    "Reshape": (0,),
    "Transpose": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "GatherND": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Flatten": (0,),
    "Identity": (0,),
    "Split": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Cast": (0,),
}
# Cheap score post-processing that follows the output Sigmoid (top-k query selection in DETR-style
# heads, per-anchor max score). ModelOpt quantizes TopK inputs by default in int8 mode, which would
# round the scores to 256 levels before ranking them; these stay with the Sigmoid in fp32.
_SCORE_TAIL_OPS = frozenset(_DATA_MOVEMENT_OPS) | {"TopK", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin"}

# Custom-op domains that the ONNX Runtime CPU provider (used for calibration and AutoCast's
# reference run) can execute; anything else (e.g. TensorRT plugins like EfficientNMS_TRT) makes
# ModelOpt switch to the TensorRT provider, which this CPU-only step cannot use.
_CPU_RUNNABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Known harmless ModelOpt messages on a CPU-only host, kept out of the log (counted in the record).
_NOISE = (
    re.compile(r"NVML Shared Library Not Found"),  # GPU count probe, logged at ERROR level on CPU
    re.compile(r"Did not find\s+in value info map"),  # empty optional input name (e.g. Resize roi)
    re.compile(r"Shared constants were detected and duplicated"),
    # Our own second AutoCast pass over the Q/DQ model; fp16 Q/DQ scales need opset 19, as intended.
    re.compile(r"Found QuantizeLinear/DequantizeLinear nodes\. Updating minimum opset"),
)
_PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm bars from ORT's calibrator
_MODELOPT_LINE = re.compile(r"\[modelopt\]\[onnx\] - [A-Z]+ - |^\S+ - modelopt\.onnx")
_MAX_FORWARDED = 25


@dataclass(frozen=True)
class PrecisionOptions:
    """What variant to make and what to keep out of low precision.

    ``nodes_to_exclude`` entries are regular expressions matched against the *whole* node name
    (a plain node name matches itself and nothing else). ModelOpt itself uses ``re.match``, a prefix
    match, where ``/model.22/Sigmoid`` would also catch ``/model.22/Sigmoid_1``; Kiln anchors them.

    For int8/fp8, ``op_types_to_exclude`` / ``nodes_to_exclude`` keep nodes out of quantization
    (they then run in ``HIGH_PRECISION_DTYPE``); for fp16/bf16 they keep nodes in fp32.
    ``keep_output_sigmoid`` keeps the output Sigmoid(s) and the score post-processing after them
    (TopK, ReduceMax, data movement) in fp32 and unquantized for every precision.
    """

    precision: str  # fp32 | fp16 | bf16 | int8 | fp8
    calib_method: str = "entropy"  # entropy | max  (int8/fp8)
    op_types_to_exclude: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    keep_output_sigmoid: bool = True  # keep the output Sigmoid(s) out of quantization / low precision
    keep_io_types: bool = True  # IO stays fp32 (AutoCast)

    def __post_init__(self) -> None:
        # Config files give lists; a frozen dataclass should hold tuples (hashable, immutable).
        object.__setattr__(self, "precision", str(self.precision).strip().lower())
        object.__setattr__(self, "calib_method", str(self.calib_method).strip().lower())
        object.__setattr__(self, "op_types_to_exclude", tuple(self.op_types_to_exclude))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))


def options_from_config(precision: str, calibration: Mapping[str, Any] | None = None) -> PrecisionOptions:
    """Options from a model's ``calibration`` config block (schemas/config.schema.yaml)."""
    c = dict(calibration or {})
    return PrecisionOptions(
        precision=precision,
        calib_method=c.get("method", "entropy"),
        op_types_to_exclude=tuple(c.get("op_types_to_exclude", ())),
        nodes_to_exclude=tuple(c.get("nodes_to_exclude", ())),
        keep_output_sigmoid=bool(c.get("keep_output_sigmoid", True)),
    )


# --------------------------------------------------------------------------------------------------
# The variant


def make_variant(
    src: Path,
    dst: Path,
    options: PrecisionOptions,
    calib: dict[str, np.ndarray] | None = None,
    log: Callable[[str], Any] = print,
) -> dict:
    """Write the ``options.precision`` variant of the fp32 ONNX ``src`` to ``dst``; return a record.

    ``calib`` maps each graph input name to an array of samples stacked on axis 0 (a multiple of the
    input's static batch size). It is required for int8/fp8 and, when given, used for fp16/bf16 too
    (AutoCast's range check runs on a few of its samples instead of random data).

    ``dst`` appears atomically: the variant is verified (ONNX checker, IO types) in a scratch
    directory, copied next to ``dst`` under a temporary name and renamed. A failure writes no
    ``dst`` (an older one stays as it was) and leaves no stray files beside ``src`` or ``dst``.
    The variant is one self-contained .onnx file (external data of ``src`` is inlined; < 2 GB).

    Raises KilnError for what the user can fix (missing/invalid ``src``, unknown precision or
    calibration method, missing or mismatching calibration data, exclusion patterns that match
    nothing); RuntimeError when ModelOpt fails or produces an invalid model.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_options(src, options)
    if src.resolve() == dst.resolve():
        raise KilnError(f"{dst}: the variant must not overwrite its source {src}; give another output path")
    model, external = _load_source(src)
    if options.precision != "fp32":
        _check_convertible(src, model, options)
    calib = _check_calib(src, model, options.precision, calib)

    record: dict[str, Any] = {
        "precision": options.precision,
        "src": str(src),
        "dst": str(dst),
        "options": {
            "calib_method": options.calib_method,
            "op_types_to_exclude": list(options.op_types_to_exclude),
            "nodes_to_exclude": list(options.nodes_to_exclude),
            "keep_output_sigmoid": options.keep_output_sigmoid,
            "keep_io_types": options.keep_io_types,
        },
        "onnx_version": onnx.__version__,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)

    if options.precision == "fp32":
        record.update(tool="copy", tool_version=None, method="copy")
        if external:  # the .onnx alone would point at data files that are not beside dst
            _atomic_write(model.SerializeToString(), dst)
        else:
            _atomic_copy(src, dst)
        record.update(_summary(model, model), size_bytes=dst.stat().st_size)
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        log(f"fp32: copied {src} -> {dst}")
        return record

    import modelopt  # lazy: pulls in torch, ~2 s
    import onnxruntime

    record.update(tool="modelopt", tool_version=modelopt.__version__, ort_version=onnxruntime.__version__)

    # ModelOpt writes intermediates (<name>_opset19.onnx, _named.onnx, ...) next to its input and
    # output; it works on a copy in a scratch dir so none land beside src or dst, even on failure.
    with scratch_dir(dst) as work:
        work_src = work / "model.onnx"
        _name_nodes(model)  # exclusion lists and our checks address nodes by name
        onnx.save(model, str(work_src))

        sigmoids = find_output_sigmoids(model) if options.keep_output_sigmoid else []
        tail = find_score_tail(model, sigmoids) if sigmoids else []
        keep_fp32 = sigmoids + tail
        user_patterns = [f"(?:{p})$" for p in options.nodes_to_exclude]
        record["excluded"] = {
            "output_sigmoids": sigmoids,
            "score_tail": tail,
            "nodes_matching_patterns": _match_nodes(model, user_patterns),
            "op_types": list(options.op_types_to_exclude),
        }

        capture = _Capture(log)
        if options.precision in LOW_PRECISIONS:
            record["method"] = "autocast"
            log(
                f"{options.precision}: ModelOpt {modelopt.__version__} AutoCast of {src.name}"
                f" (fp32 kept for {len(keep_fp32)} output-sigmoid/score nodes"
                f"{', op types ' + ','.join(options.op_types_to_exclude) if options.op_types_to_exclude else ''})"
            )
            out = _autocast(
                work_src,
                work / "variant.onnx",
                options.precision,
                keep_io_types=options.keep_io_types,
                nodes_to_exclude=[_anchor(n) for n in keep_fp32] + user_patterns,
                op_types_to_exclude=list(options.op_types_to_exclude),
                calib=_first_samples(model, calib, AUTOCAST_REFERENCE_SAMPLES),
                work=work,
                capture=capture,
                what=str(src),
            )
        else:
            n = next(iter(calib.values())).shape[0]
            record.update(method=options.calib_method, calib_samples=int(n), high_precision_dtype=HIGH_PRECISION_DTYPE)
            log(
                f"{options.precision}: ModelOpt {modelopt.__version__} PTQ of {src.name}, "
                f"{options.calib_method} calibration on {n} samples (ORT CPU), "
                f"{len(keep_fp32)} output-sigmoid/score nodes unquantized and fp32"
            )
            quant = work / "quant.onnx"
            # AutoCast's fp16 range check runs the model in ORT with all graph optimisations on;
            # for fp8 Q/DQ those produced an invalid graph in onnxruntime 1.31 (the capability probe in
            # kiln.backends.ort_capabilities finds it), so fp8 goes without
            # it, exactly like ModelOpt's own high_precision_dtype="fp16" pass (no range check).
            range_check = options.precision == "int8"
            record["fp16_range_check"] = range_check
            _quantize(
                work_src,
                quant,
                options.precision,
                calib=calib,
                method=options.calib_method,
                nodes_to_exclude=[_anchor(n) for n in keep_fp32] + user_patterns,
                op_types_to_exclude=list(options.op_types_to_exclude),
                capture=capture,
                what=str(src),
            )
            # Second pass: the Q/DQ model was made with fp32 as "high precision" so that AutoCast
            # can now lower the rest to fp16 while keeping the output Sigmoid and score tail fp32
            # by node name. ModelOpt's own fp16 pass (high_precision_dtype="fp16") only takes op
            # types, which would also pin every SiLU Sigmoid of the backbone to fp32.
            out = _autocast(
                quant,
                work / "variant.onnx",
                HIGH_PRECISION_DTYPE,
                keep_io_types=options.keep_io_types,
                nodes_to_exclude=[_anchor(n) for n in keep_fp32],
                op_types_to_exclude=[],
                calib=_first_samples(model, calib, AUTOCAST_REFERENCE_SAMPLES),
                work=work,
                capture=capture,
                what=str(src),
                range_check=range_check,
            )

        variant = onnx.load(str(out))
        _canonical_value_info(variant.graph)
        _verify(src, model, variant, options)
        record.update(_summary(model, variant))
        record["output_sigmoids"] = _sigmoid_report(variant, sigmoids)
        _warn_about_result(record, options, log)
        record["modelopt_warnings"] = capture.warnings
        record["modelopt_noise_suppressed"] = capture.suppressed
        # The canonical proto, not ModelOpt's file: same bytes for the same input on every run.
        _atomic_write(variant.SerializeToString(), dst)

    record["size_bytes"] = dst.stat().st_size
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    added = record["op_delta"]
    log(
        f"{options.precision}: wrote {dst} in {record['wall_s']:.1f} s, opset {record['opset']}; "
        + ", ".join(f"{k} {v:+d}" for k, v in sorted(added.items()))
        + f"; node dtypes {record['nodes_by_output_dtype']}"
    )
    return record


# --------------------------------------------------------------------------------------------------
# Graph analysis


def find_output_sigmoids(model: onnx.ModelProto) -> list[str]:
    """Names of the Sigmoid nodes that feed graph outputs through data-movement ops only.

    From each graph output we walk back through Concat/Reshape/Transpose/Slice/Gather/... (data
    inputs only) and stop at the first Sigmoid on each path; any other op ends the path. Backbone
    Sigmoids (SiLU) are never reached because a Mul or Conv lies between them and the outputs.
    """
    producer = {o: n for n in model.graph.node for o in n.output if o}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Sigmoid":
            found.append(node.name)
        elif node.op_type in _DATA_MOVEMENT_OPS:
            idx = _DATA_MOVEMENT_OPS[node.op_type]
            inputs = node.input if idx is None else [node.input[i] for i in idx if i < len(node.input)]
            stack.extend(i for i in inputs if i)
    return sorted(found)


def find_score_tail(model: onnx.ModelProto, sigmoids: Sequence[str]) -> list[str]:
    """Nodes downstream of ``sigmoids`` that only post-process scores (data movement, TopK, ReduceMax).

    Excluding them keeps e.g. Concat(boxes, scores) from sharing one int8 scale between box
    coordinates and probabilities, and keeps TopK ranking fp32 scores.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in model.graph.node}
    tail: list[str] = []
    seen = set(sigmoids)
    stack = [o for s in sigmoids for o in by_name[s].output]
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name in seen or n.op_type not in _SCORE_TAIL_OPS:
                continue
            seen.add(n.name)
            tail.append(n.name)
            stack.extend(o for o in n.output if o)
    return tail


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed or duplicate-named nodes unique names (ModelOpt addresses nodes by name)."""
    used: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in used:
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            n.name = name
        used.add(n.name)


def _canonical_value_info(graph: onnx.GraphProto) -> None:
    """Sort value_info by name, in subgraphs too, so a variant's bytes do not depend on the hash seed.

    AutoCast collects the tensors to cast in a Python set (``list(set(cast_to_fp16) - initializers)``
    in ModelOpt 0.47's precisionconverter) and appends their value_info in that order, which changes
    with PYTHONHASHSEED from one process to the next. value_info order carries no meaning; nodes stay
    as ModelOpt sorted them.
    """
    graph.value_info.sort(key=lambda v: v.name)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _canonical_value_info(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _canonical_value_info(g)


def _anchor(name: str) -> str:
    """A pattern that (with ModelOpt's re.match) matches exactly this node name."""
    return re.escape(name) + "$"


def _match_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    return [n.name for n in model.graph.node if any(re.match(p, n.name) for p in patterns)]


# --------------------------------------------------------------------------------------------------
# Checks that turn user mistakes into KilnError


def _check_options(src: Path, options: PrecisionOptions) -> None:
    if options.precision not in PRECISIONS:
        raise KilnError(
            f"{src}: precision {options.precision!r} is unknown; use one of {', '.join(PRECISIONS)}"
            " (key: devices.<name>.precisions)"
        )
    if options.precision in QUANT_PRECISIONS and options.calib_method not in CALIB_METHODS:
        raise KilnError(
            f"{src}: calibration method {options.calib_method!r} is unknown for {options.precision}; "
            f"use one of {', '.join(CALIB_METHODS)} (key: models.<name>.calibration.method)"
        )
    for op in options.op_types_to_exclude:
        if not onnx.defs.has(op):
            raise KilnError(
                f"{src}: op_types_to_exclude entry {op!r} is not an ONNX op type (they are case-sensitive, "
                "e.g. 'Sigmoid', 'TopK'); fix models.<name>.calibration.op_types_to_exclude"
            )
    for p in options.nodes_to_exclude:
        try:
            re.compile(p)
        except re.error as e:
            raise KilnError(
                f"{src}: nodes_to_exclude entry {p!r} is not a valid regular expression ({e}); "
                "fix models.<name>.calibration.nodes_to_exclude"
            ) from None


def _load_source(src: Path) -> tuple[onnx.ModelProto, bool]:
    """The checked model with its weights loaded, and whether they came from external data files."""
    if not src.is_file():
        raise KilnError(f"{src}: ONNX file not found; export the fp32 model first or fix the path")
    try:
        onnx.checker.check_model(str(src))  # path form: works for >2 GB / external-data models
        model = onnx.load(str(src), load_external_data=False)
        external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
        return model, external
    except Exception as e:  # noqa: BLE001  DecodeError, ValidationError, OSError...: all mean unusable
        msg = " ".join(str(e).split())[:300]
        raise KilnError(
            f"{src}: not a valid ONNX model ({type(e).__name__}: {msg}); re-export it "
            "(delete the file so the export step runs again)"
        ) from None


def _check_convertible(src: Path, model: onnx.ModelProto, options: PrecisionOptions) -> None:
    ops = Counter(n.op_type for n in model.graph.node)
    if ops["QuantizeLinear"] or ops["DequantizeLinear"]:
        raise KilnError(
            f"{src}: already contains QuantizeLinear/DequantizeLinear nodes; precision variants are "
            "made from the plain fp32 export, give that instead"
        )
    low = sum(
        1 for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    )
    f32 = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    if low > f32:
        raise KilnError(
            f"{src}: most weights are already fp16/bf16; precision variants are made from the fp32 "
            "export (export with half=False)"
        )
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in _CPU_RUNNABLE_DOMAINS})
    if custom:
        raise KilnError(
            f"{src}: has custom ops {', '.join(custom)} that ONNX Runtime CPU cannot run, so ModelOpt "
            "cannot calibrate or range-check it here; make precision variants before adding TensorRT "
            "plugins (e.g. EfficientNMS_TRT), or exclude the plugin step for this model"
        )
    for i, p in enumerate(options.nodes_to_exclude):
        if not _match_nodes(model, [f"(?:{p})$"]):
            names = [n.name for n in model.graph.node[:3]]
            raise KilnError(
                f"{src}: nodes_to_exclude entry {p!r} matches no node (patterns must match the whole "
                f"node name, e.g. {names}); fix models.<name>.calibration.nodes_to_exclude[{i}]"
            )


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _check_calib(
    src: Path, model: onnx.ModelProto, precision: str, calib: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    """Validate calibration samples against the graph inputs; return them in the inputs' dtypes."""
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    if not calib:
        if precision in QUANT_PRECISIONS:
            raise KilnError(
                f"{src}: {precision} needs calibration data for inputs {names} (calibration images: "
                f"datasets.<name>.calib and models.<name>.calibration.images); none was given"
            )
        return None
    if set(calib) != set(names):
        raise KilnError(
            f"{src}: calibration data has inputs {sorted(calib)} but the graph inputs are {names}; "
            "make the calibration arrays under the graph's input names (re-run the calibration-inputs step)"
        )
    out: dict[str, np.ndarray] = {}
    batches: set[int] = set()
    for vi in inputs:
        a = np.asarray(calib[vi.name])
        tt = vi.type.tensor_type
        # Unknown rank (no shape in the graph): accept any shape, ModelOpt/ORT will complain if wrong.
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        else:
            dims = [None] * a.ndim
        if a.ndim != len(dims):
            raise KilnError(
                f"{src}: calibration input {vi.name!r} has shape {a.shape}, the graph expects rank {len(dims)} "
                f"({_dims_str(dims)}); stack samples on axis 0 in the model's input layout"
            )
        if any(dims[k] is not None and dims[k] != a.shape[k] for k in range(1, a.ndim)):
            raise KilnError(
                f"{src}: calibration input {vi.name!r} has samples of shape {a.shape[1:]}, the graph "
                f"expects ({_dims_str(dims)}); regenerate the calibration inputs at the export's input size"
            )
        batch = dims[0] or 1  # ModelOpt feeds calibration in chunks of the static batch size
        if a.shape[0] == 0 or a.shape[0] % batch:
            raise KilnError(
                f"{src}: calibration input {vi.name!r} holds {a.shape[0]} samples, which is not a non-zero "
                f"multiple of the export's static batch size {batch}; give a multiple of {batch}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
                raise KilnError(f"{src}: calibration input {vi.name!r} has dtype {a.dtype}, expected {dtype}")
            a = a.astype(dtype, copy=False)
            if not np.isfinite(a).all():
                raise KilnError(
                    f"{src}: calibration input {vi.name!r} contains NaN/Inf; fix the calibration images "
                    "or preprocessing"
                )
        elif a.dtype != dtype:
            a = a.astype(dtype)
        out[vi.name] = np.ascontiguousarray(a)
        batches.add(a.shape[0] // batch)
    if len(batches) > 1:
        raise KilnError(
            f"{src}: calibration inputs hold different numbers of samples {sorted(batches)}; "
            "give every input the same number"
        )
    return out


def _first_samples(
    model: onnx.ModelProto, calib: Mapping[str, np.ndarray] | None, batches: int
) -> dict[str, np.ndarray] | None:
    """The first ``batches`` batches of ``calib`` (AutoCast keeps every activation of every batch)."""
    if calib is None:
        return None
    out = {}
    for vi in _graph_inputs(model):
        d0 = vi.type.tensor_type.shape.dim
        batch = d0[0].dim_value if d0 and d0[0].HasField("dim_value") and d0[0].dim_value > 0 else 1
        out[vi.name] = calib[vi.name][: batches * batch]
    return out


def _dims_str(dims: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


# --------------------------------------------------------------------------------------------------
# ModelOpt calls


def _autocast(
    src: Path,
    dst: Path,
    low: str,
    *,
    keep_io_types: bool,
    nodes_to_exclude: list[str],
    op_types_to_exclude: list[str],
    calib: Mapping[str, np.ndarray] | None,
    work: Path,
    capture: _Capture,
    what: str,
    range_check: bool = True,
) -> Path:
    """ModelOpt AutoCast ``src`` to fp16/bf16 at ``dst``.

    With ``range_check`` AutoCast runs ``src`` once in ORT CPU (on ``calib`` or random data) and
    keeps nodes whose activations exceed +-512 (where fp16's step is 0.5) in fp32; without it every
    node not excluded goes to ``low``.
    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    ref = None
    if calib is not None and range_check:
        # AutoCast's reference run takes an .npz path (samples stacked on axis 0, like quantize()).
        ref = str(work / "autocast_reference.npz")
        np.savez(ref, **calib)
    with capture.active():
        try:
            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type=low,
                nodes_to_exclude=nodes_to_exclude or None,
                op_types_to_exclude=op_types_to_exclude or None,
                keep_io_types=keep_io_types,
                calibration_data=ref if range_check else None,
                **({} if range_check else {"data_max": np.inf}),
                providers=["cpu"],  # a fresh list: ModelOpt mutates its default
            )
            onnx.save(model, str(dst))
        except Exception as e:
            raise RuntimeError(
                f"ModelOpt AutoCast ({low}) failed on {what}: {type(e).__name__}: {e}{capture.context()}"
            ) from e
    return dst


def _quantize(
    src: Path,
    dst: Path,
    mode: str,
    *,
    calib: Mapping[str, np.ndarray],
    method: str,
    nodes_to_exclude: list[str],
    op_types_to_exclude: list[str],
    capture: _Capture,
    what: str,
) -> Path:
    """ModelOpt ONNX PTQ (explicit Q/DQ, fp32 elsewhere) of ``src`` at ``dst``, calibrated on ORT CPU."""
    from modelopt.onnx.quantization import quantize

    with capture.active():
        try:
            quantize(
                onnx_path=str(src),
                quantize_mode=mode,
                calibration_data=dict(calib),
                calibration_method=method,
                calibration_eps=["cpu"],
                nodes_to_exclude=list(nodes_to_exclude) or None,
                op_types_to_exclude=list(op_types_to_exclude) or None,
                output_path=str(dst),
                high_precision_dtype="fp32",  # fp16 comes from the AutoCast pass after this
                log_level="WARNING",
            )
        except Exception as e:
            raise RuntimeError(
                f"ModelOpt {mode} quantization failed on {what}: {type(e).__name__}: {e}{capture.context()}"
            ) from e
    if not dst.is_file():
        raise RuntimeError(f"ModelOpt {mode} quantization of {what} wrote no model{capture.context()}")
    return dst


# --------------------------------------------------------------------------------------------------
# Verification and the record


def _verify(src: Path, model: onnx.ModelProto, variant: onnx.ModelProto, options: PrecisionOptions) -> None:
    """Refuse to publish a variant that the ONNX checker rejects or whose IO types drifted."""
    try:
        onnx.checker.check_model(variant)
    except Exception as e:
        raise RuntimeError(f"{options.precision} variant of {src} fails the ONNX checker: {e}") from e
    if options.keep_io_types:
        want = {v.name: v.type.tensor_type.elem_type for v in [*_graph_inputs(model), *model.graph.output]}
        got = {v.name: v.type.tensor_type.elem_type for v in [*_graph_inputs(variant), *variant.graph.output]}
        if want != got:
            raise RuntimeError(f"{options.precision} variant of {src} changed its IO types: {want} -> {got}")


def _dtype_name(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t).lower()


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, after type inference (best effort)."""
    try:
        m = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  statistics only: fall back to the types the model already declares
        m = model
    types = {t.name: t.data_type for t in m.graph.initializer}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _summary(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, Any]:
    """Op-count changes, dtype histograms and what got quantized, as JSON-ready values."""
    ops_before = Counter(n.op_type for n in before.graph.node)
    ops_after = Counter(n.op_type for n in after.graph.node)
    delta = {k: ops_after[k] - ops_before[k] for k in set(ops_before) | set(ops_after)}
    types = _tensor_types(after)
    plumbing = ("Constant", "QuantizeLinear", "DequantizeLinear", "Cast")
    compute = [n for n in after.graph.node if n.op_type not in plumbing]
    node_dtypes = Counter(_dtype_name(types[n.output[0]]) for n in compute if n.output and n.output[0] in types)
    producer = {o: n for n in after.graph.node for o in n.output}
    quantized = Counter(
        n.op_type for n in compute if any(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)
    )
    q_types = Counter(
        _dtype_name(types[n.output[0]])
        for n in after.graph.node
        if n.op_type == "QuantizeLinear" and n.output[0] in types
    )
    return {
        "opset": next((o.version for o in after.opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": sum(ops_after.values()),
        "op_delta": {k: v for k, v in sorted(delta.items()) if v},
        "added": {k: max(0, delta.get(k, 0)) for k in ("QuantizeLinear", "DequantizeLinear", "Cast")},
        "initializers_by_dtype": dict(Counter(_dtype_name(t.data_type) for t in after.graph.initializer)),
        "tensors_by_dtype": dict(Counter(_dtype_name(t) for t in types.values())),
        "nodes_by_output_dtype": dict(node_dtypes),
        "quantized_ops": dict(quantized),
        "quantized_dtype": dict(q_types),
        "io": {v.name: _dtype_name(v.type.tensor_type.elem_type) for v in [*_graph_inputs(after), *after.graph.output]},
    }


def _sigmoid_report(variant: onnx.ModelProto, sigmoids: Sequence[str]) -> list[dict[str, Any]]:
    """For each kept output Sigmoid: does it still exist, is it fed by a DequantizeLinear, its dtype."""
    producer = {o: n for n in variant.graph.node for o in n.output}
    by_name = {n.name: n for n in variant.graph.node}
    types = _tensor_types(variant)
    report = []
    for s in sigmoids:
        n = by_name.get(s)
        if n is None:
            report.append({"name": s, "present": False})
            continue
        src = producer.get(n.input[0])
        report.append(
            {
                "name": s,
                "present": True,
                "fed_by_dequantize": bool(src is not None and src.op_type == "DequantizeLinear"),
                "input_dtype": _dtype_name(types.get(n.input[0], 0)),
            }
        )
    return report


def _warn_about_result(record: dict[str, Any], options: PrecisionOptions, log: Callable[[str], Any]) -> None:
    if options.precision in QUANT_PRECISIONS and not record["added"]["QuantizeLinear"] and not record["quantized_ops"]:
        log(
            f"WARNING: ModelOpt inserted no Q/DQ; this {options.precision} variant is the fp16 model. "
            "ModelOpt skips Convs with <16 channels (fp8: <=16 or kernels >32 taps) and small MatMuls."
        )
    for s in record.get("output_sigmoids", []):
        if not s.get("present"):
            log(f"WARNING: output Sigmoid {s['name']} is gone from the variant; cannot confirm it stayed fp32")
        elif s["fed_by_dequantize"] or s["input_dtype"] not in ("float", "undefined"):
            log(f"WARNING: output Sigmoid {s['name']} is not plain fp32 ({s}); check the exclusion")


def _atomic_write(data: bytes, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def _atomic_copy(path: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(path, tmp)


# --------------------------------------------------------------------------------------------------
# ModelOpt logging


class _Capture:
    """Routes ModelOpt's and ORT's chatter: warnings go to ``log`` once each, the rest is dropped.

    ModelOpt logs INFO to stdout by default (dozens of lines per model, hundreds with AutoCast's
    per-node range messages) and ORT's calibrator prints progress bars. Warnings are kept: forwarded
    (deduplicated, truncated, at most ``_MAX_FORWARDED``) and listed in the record. A short tail of
    everything is kept to explain a failure.
    """

    def __init__(self, log: Callable[[str], Any]):
        self.log = log
        self.warnings: list[str] = []
        self.suppressed = 0
        self.tail: deque[str] = deque(maxlen=30)
        self._seen: set[str] = set()

    def warning(self, text: str) -> None:
        text = " ".join(text.split())[:400]
        self.tail.append(text)
        if any(p.search(text) for p in _NOISE):
            self.suppressed += 1
            return
        if text in self._seen:
            return
        self._seen.add(text)
        self.warnings.append(text)

    def _forward(self, start: int) -> None:
        # Called after stdout/stderr are restored: ``log`` may well be print(), and printing into
        # our own sink would feed the warning back into itself.
        for i, text in enumerate(self.warnings[start:], start):
            if i < _MAX_FORWARDED:
                self.log(f"  modelopt: {text}")
            elif i == _MAX_FORWARDED:
                self.log(f"  modelopt: {len(self.warnings) - i} more warnings, listed in the record")
                break

    def line(self, text: str) -> None:
        text = text.strip()
        if not text or _PROGRESS.search(text) or _MODELOPT_LINE.search(text):
            return  # progress bars; ModelOpt records reach us through the handler already
        if re.search(r"\b\w*(Warning|Error)\b|\bWARN", text):
            self.warning(text)
        else:
            self.tail.append(text[:400])

    def context(self) -> str:
        return ("\n  last ModelOpt output:\n    " + "\n    ".join(self.tail)) if self.tail else ""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Capture for the duration of one ModelOpt call; restores logger state afterwards."""
        names = [n for n in list(logging.root.manager.loggerDict) if n == "modelopt" or n.startswith("modelopt.")]
        names = sorted(set(names) | {"modelopt", "modelopt.onnx", "modelopt.onnx.autocast"})
        saved = {}
        for n in names:
            lg = logging.getLogger(n)
            saved[n] = (lg.handlers[:], lg.level, lg.propagate)
            if n != "modelopt":
                # Handlers made at import time write to the real stdout; everything should flow up
                # to "modelopt" instead, where our handler is and propagation to the root stops.
                for h in lg.handlers[:]:
                    lg.removeHandler(h)
                lg.setLevel(logging.WARNING)
                lg.propagate = True
        top = logging.getLogger("modelopt")
        handler = _Handler(self)
        top.addHandler(handler)
        top.propagate = False  # the app's root handlers would print every record a second time
        top.setLevel(logging.WARNING)
        # quantize() re-runs ModelOpt's configure_logging(), which re-adds a stdout handler and
        # ORT's calibrator print()s; both land in these sinks (bound to sys.stdout at call time).
        out, err = _Sink(self), _Sink(self)
        start = len(self.warnings)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            out.flush_pending()
            err.flush_pending()
            top.removeHandler(handler)
            for n, (handlers, level, propagate) in saved.items():
                lg = logging.getLogger(n)
                for h in lg.handlers[:]:
                    lg.removeHandler(h)
                for h in handlers:
                    lg.addHandler(h)
                lg.setLevel(level)
                lg.propagate = propagate
            self._forward(start)


class _Handler(logging.Handler):
    def __init__(self, capture: _Capture):
        super().__init__(level=logging.WARNING)
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.capture.warning(f"{record.levelname}: {record.getMessage()}")
        except Exception:  # noqa: BLE001  logging must never break the conversion
            self.handleError(record)


class _Sink(io.TextIOBase):
    """A write-only text stream that hands complete lines to a _Capture."""

    def __init__(self, capture: _Capture):
        self.capture = capture
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = re.split(r"[\r\n]", self._buf)
        for line in lines:
            self.capture.line(line)
        return len(s)

    def flush_pending(self) -> None:
        if self._buf:
            self.capture.line(self._buf)
            self._buf = ""


# --------------------------------------------------------------------------------------------------
# The `precision` and `quantize` rules


def params(cfg, model: str, precision: str) -> dict:
    """What changes a variant's bytes (tracked by Snakemake): the calibration block for int8/fp8."""
    if precision in QUANT_PRECISIONS:
        return {"precision": precision, "calibration": dict(cfg.models[model].calibration)}
    return {"precision": precision}


def variant_for_rule(
    cfg,
    model: str,
    precision: str,
    src: str | Path,
    dst: str | Path,
    record: str | Path,
    calib_npz: str | Path | None = None,
    calib_list: str | Path | None = None,
    annotations: str | Path | None = None,
) -> dict:
    """Make one variant for the workflow: calibration data from the preprocessed calib split.

    `annotations` is the calib split's annotations.json as the rule was given it (a local copy
    under a storage provider); by default the artifact path under cfg.results.
    """
    from kiln.batches import load as load_inputs

    spec = cfg.models[model]
    options = options_from_config(precision, spec.calibration)
    calib = names = None
    if precision in QUANT_PRECISIONS:
        data = load_inputs(calib_npz)
        n = min(len(data), spec.calibration["images"])
        calib = data.feeds(spec, 0, n)
        names = _calib_file_names(cfg, spec, data.image_ids[:n], annotations)
    logger = logging.getLogger(__name__)
    logger.info("%s %s: making %s variant of %s", model, precision, precision, src)
    info = make_variant(Path(src), Path(dst), options, calib=calib, log=logger.warning)
    info["calibration_images"] = len(calib["images"]) if calib else 0
    write_json(record, info)
    if names is not None:
        # Last, atomically, after the ONNX it belongs to: a job killed before that leaves no list that looks
        # finished beside a missing (or older) variant.
        with atomic_path(calib_list) as tmp:
            tmp.write_text("".join(f"{name}\n" for name in names))
    logger.info("%s %s: done in %.2f s", model, precision, info["wall_s"])
    return info


def _calib_file_names(cfg, spec, image_ids, ann=None) -> list[str]:
    """File names of the calibration images, in the order they were fed."""
    import json

    from kiln import paths

    ann = ann or paths.fmt(paths.DATASET, results=cfg.results, dataset=spec.dataset, split="calib")
    by_id = {im["id"]: im["file_name"] for im in json.loads(Path(ann).read_text())["images"]}
    return [by_id[int(i)] for i in image_ids]
