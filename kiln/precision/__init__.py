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

Modules, each rule's first:

* ``cast``: rule ``precision`` (fp32 copy, fp16/bf16 by AutoCast), scripts/precision.py.
* ``quantize``: rule ``quantize`` (int8/fp8 by PTQ, then AutoCast; the calibration image list),
  scripts/quantize.py. It imports ``cast`` for AutoCast; ``cast`` imports nothing of it, so an
  edit to quantization does not rerun fp16 variants (kiln.fingerprint follows imports).
* ``variant``: the steps both rules share around their conversion (checks, scratch directory,
  verification, record, atomic write).
* ``options``: PrecisionOptions and the precisions, calibration methods, ``HIGH_PRECISION_DTYPE``.
* ``graph``: graph queries: output Sigmoids and score tail, node names and patterns, graph inputs.
* ``checks``: user mistakes become KilnError; the variant's checker and IO-type check.
* ``records``: what the .json beside each variant holds.
* ``modelopt_log``: ModelOpt's and ONNX Runtime's logging during a conversion.

Inside the package, modules import each other as ``from kiln.precision.graph import ...``, never
``from kiln.precision import graph``: the latter names this file, which imports both rules, and
would put each rule's code in the other's fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.precision.graph import find_output_sigmoids, find_score_tail
from kiln.precision.options import (
    AUTOCAST_REFERENCE_SAMPLES,
    CALIB_METHODS,
    HIGH_PRECISION_DTYPE,
    LOW_PRECISIONS,
    PRECISIONS,
    QUANT_PRECISIONS,
    PrecisionOptions,
    options_from_config,
    params,
)

__all__ = [
    "AUTOCAST_REFERENCE_SAMPLES",
    "CALIB_METHODS",
    "HIGH_PRECISION_DTYPE",
    "LOW_PRECISIONS",
    "PRECISIONS",
    "QUANT_PRECISIONS",
    "PrecisionOptions",
    "find_output_sigmoids",
    "find_score_tail",
    "make_variant",
    "options_from_config",
    "params",
    "variant_for_rule",
]


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
    from kiln.precision import cast, quantize  # here: planning imports this package for params() alone

    rule = quantize if options.precision in QUANT_PRECISIONS else cast
    return rule.make_variant(src, dst, options, calib=calib, log=log)


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
    """Make one variant for the workflow: rule quantize's for int8/fp8, rule precision's otherwise.

    The calibration arguments are quantize's (kiln.precision.quantize.variant_for_rule); other
    precisions ignore them.
    """
    from kiln.precision import cast, quantize

    if precision in QUANT_PRECISIONS:
        return quantize.variant_for_rule(cfg, model, precision, src, dst, record, calib_npz, calib_list, annotations)
    return cast.variant_for_rule(cfg, model, precision, src, dst, record)
