"""ModelOpt's ONNX PTQ: the int8/fp8 Q/DQ variant of an fp32 ONNX, then AutoCast of the rest to fp16.

The conversion the quantize rule runs (kiln/precision/quantize.py) and the mixed-precision fallback
reruns with nodes excluded (kiln/precision/fallback.py); below both rule modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.precision.autocast import autocast
from kiln.precision.graph import anchor, first_samples
from kiln.precision.modelopt_log import Capture
from kiln.precision.options import (
    AUTOCAST_REFERENCE_SAMPLES,
    HIGH_PRECISION_DTYPE,
    QUANT_PRECISIONS,
    PrecisionOptions,
)
from kiln.precision.variant import Conversion, make

logger = logging.getLogger("kiln.precision")
RULE_PRECISIONS = QUANT_PRECISIONS  # what PTQ makes


def make_variant(
    src: Path,
    dst: Path,
    options: PrecisionOptions,
    calib: dict[str, np.ndarray] | None = None,
    log: Callable[[str], Any] = print,
) -> dict:
    """The int8 or fp8 variant of ``src`` at ``dst``, as kiln.precision.make_variant describes."""
    return make(src, dst, options, calib, log, precisions=RULE_PRECISIONS, convert=_convert)


def _convert(c: Conversion) -> Path:
    """PTQ with the output Sigmoids, score tail and user's exclusions unquantized, then AutoCast the rest."""
    import modelopt

    options, calib, work = c.options, c.calib, c.work
    n = next(iter(calib.values())).shape[0]
    c.record.update(method=options.calib_method, calib_samples=int(n), high_precision_dtype=HIGH_PRECISION_DTYPE)
    c.log(
        f"{options.precision}: ModelOpt {modelopt.__version__} PTQ of {c.src.name}, "
        f"{options.calib_method} calibration on {n} samples (ORT CPU), "
        f"{len(c.keep_fp32)} output-sigmoid/score nodes unquantized and fp32"
    )
    quant = work / "quant.onnx"
    # AutoCast's fp16 range check runs the model in ORT with all graph optimisations on;
    # for fp8 Q/DQ those produced an invalid graph in onnxruntime 1.31 (the capability probe in
    # kiln.backends.ort_capabilities finds it), so fp8 goes without
    # it, exactly like ModelOpt's own high_precision_dtype="fp16" pass (no range check).
    range_check = options.precision == "int8"
    c.record["fp16_range_check"] = range_check
    _quantize(
        c.path,
        quant,
        options.precision,
        calib=calib,
        method=options.calib_method,
        nodes_to_exclude=[anchor(n) for n in c.keep_fp32] + c.user_patterns,
        op_types_to_exclude=list(options.op_types_to_exclude),
        capture=c.capture,
        what=str(c.src),
    )
    # Second pass: the Q/DQ model was made with fp32 as "high precision" so that AutoCast
    # can now lower the rest to fp16 while keeping the output Sigmoid and score tail fp32
    # by node name. ModelOpt's own fp16 pass (high_precision_dtype="fp16") only takes op
    # types, which would also pin every SiLU Sigmoid of the backbone to fp32.
    return autocast(
        quant,
        work / "variant.onnx",
        HIGH_PRECISION_DTYPE,
        keep_io_types=options.keep_io_types,
        nodes_to_exclude=[anchor(n) for n in c.keep_fp32],
        op_types_to_exclude=[],
        calib=first_samples(c.model, calib, AUTOCAST_REFERENCE_SAMPLES),
        work=work,
        capture=c.capture,
        what=str(c.src),
        range_check=range_check,
    )


def _quantize(
    src: Path,
    dst: Path,
    mode: str,
    *,
    calib: Mapping[str, np.ndarray],
    method: str,
    nodes_to_exclude: list[str],
    op_types_to_exclude: list[str],
    capture: Capture,
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
