"""ModelOpt AutoCast as a variant: the fp32 copy, or fp16/bf16 of an fp32 ONNX, with the output Sigmoids,
score tail and the user's exclusions kept fp32.

The conversion rule precision runs (kiln/precision/cast.py) and the mixed-precision fallback reruns
with nodes excluded for ``fp16-mixed`` (kiln/precision/fallback.py); below both rule modules, as
kiln/precision/ptq.py is for int8/fp8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.precision.autocast import autocast
from kiln.precision.graph import anchor, first_samples
from kiln.precision.options import AUTOCAST_REFERENCE_SAMPLES, LOW_PRECISIONS, PrecisionOptions
from kiln.precision.variant import Conversion, make

RULE_PRECISIONS = ("fp32", *LOW_PRECISIONS)  # what rule precision makes


def make_variant(
    src: Path,
    dst: Path,
    options: PrecisionOptions,
    calib: dict[str, np.ndarray] | None = None,
    log: Callable[[str], Any] = print,
) -> dict:
    """The fp32, fp16 or bf16 variant of ``src`` at ``dst``, as kiln.precision.make_variant describes."""
    return make(src, dst, options, calib, log, precisions=RULE_PRECISIONS, convert=_convert)


def _convert(c: Conversion) -> Path:
    """AutoCast to ``c.options.precision``, the output Sigmoids, score tail and user's exclusions kept fp32."""
    import modelopt

    options = c.options
    c.record["method"] = "autocast"
    c.log(
        f"{options.precision}: ModelOpt {modelopt.__version__} AutoCast of {c.src.name}"
        f" (fp32 kept for {len(c.keep_fp32)} output-sigmoid/score nodes"
        f"{', op types ' + ','.join(options.op_types_to_exclude) if options.op_types_to_exclude else ''})"
    )
    return autocast(
        c.path,
        c.work / "variant.onnx",
        options.precision,
        keep_io_types=options.keep_io_types,
        nodes_to_exclude=[anchor(n) for n in c.keep_fp32] + c.user_patterns,
        op_types_to_exclude=list(options.op_types_to_exclude),
        calib=first_samples(c.model, c.calib, AUTOCAST_REFERENCE_SAMPLES),
        work=c.work,
        capture=c.capture,
        what=str(c.src),
    )
