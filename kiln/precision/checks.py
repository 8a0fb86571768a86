"""Checks before and after a conversion: user mistakes become KilnError, a broken result RuntimeError."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from kiln.errors import KilnError
from kiln.precision.graph import graph_inputs, match_nodes
from kiln.precision.options import CALIB_METHODS, PRECISIONS, QUANT_PRECISIONS, PrecisionOptions

# Custom-op domains that the ONNX Runtime CPU provider (used for calibration and AutoCast's
# reference run) can execute; anything else (e.g. TensorRT plugins like EfficientNMS_TRT) makes
# ModelOpt switch to the TensorRT provider, which this CPU-only step cannot use.
_CPU_RUNNABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def check_options(src: Path, options: PrecisionOptions) -> None:
    """Refuse an unknown precision or calibration method, unknown op types and invalid patterns."""
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


def load_source(src: Path) -> tuple[onnx.ModelProto, bool]:
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


def check_convertible(src: Path, model: onnx.ModelProto, options: PrecisionOptions) -> None:
    """Refuse a source that is not a plain fp32 export ModelOpt can run on ORT CPU, or patterns matching nothing."""
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
        if not match_nodes(model, [f"(?:{p})$"]):
            names = [n.name for n in model.graph.node[:3]]
            raise KilnError(
                f"{src}: nodes_to_exclude entry {p!r} matches no node (patterns must match the whole "
                f"node name, e.g. {names}); fix models.<name>.calibration.nodes_to_exclude[{i}]"
            )


def check_calib(
    src: Path, model: onnx.ModelProto, precision: str, calib: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    """Validate calibration samples against the graph inputs; return them in the inputs' dtypes."""
    inputs = graph_inputs(model)
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


def _dims_str(dims: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def verify(src: Path, model: onnx.ModelProto, variant: onnx.ModelProto, options: PrecisionOptions) -> None:
    """Refuse to publish a variant that the ONNX checker rejects or whose IO types drifted."""
    try:
        onnx.checker.check_model(variant)
    except Exception as e:
        raise RuntimeError(f"{options.precision} variant of {src} fails the ONNX checker: {e}") from e
    if options.keep_io_types:
        want = {v.name: v.type.tensor_type.elem_type for v in [*graph_inputs(model), *model.graph.output]}
        got = {v.name: v.type.tensor_type.elem_type for v in [*graph_inputs(variant), *variant.graph.output]}
        if want != got:
            raise RuntimeError(f"{options.precision} variant of {src} changed its IO types: {want} -> {got}")
