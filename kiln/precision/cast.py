"""Rule ``precision``: the fp32 copy (kiln.precision.variant) and fp16/bf16 variants by ModelOpt AutoCast.

AutoCast (``convert_to_mixed_precision``) keeps in fp32 the nodes whose reference activations
exceed +-512 (where fp16's step is already 0.5), inserts Cast nodes at the borders and keeps graph
IO fp32 (``keep_io_types``). bf16 needs opset 22; AutoCast raises it. The range check runs on a few
calibration samples when given, else on random data.

``autocast`` is also the second pass of rule ``quantize`` (kiln.precision.quantize), which is why
that module imports this one; this one imports nothing of quantization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.precision.autocast import autocast
from kiln.precision.graph import anchor, first_samples
from kiln.precision.options import AUTOCAST_REFERENCE_SAMPLES, LOW_PRECISIONS, PrecisionOptions, options_from_config
from kiln.precision.variant import Conversion, make
from kiln.util import write_json

RULE_PRECISIONS = ("fp32", *LOW_PRECISIONS)  # what rule precision makes

# The package's name, as before it was split in modules: the rule's log lines read the same.
logger = logging.getLogger("kiln.precision")


def variant_for_rule(
    cfg,
    model: str,
    precision: str,
    src: str | Path,
    dst: str | Path,
    record: str | Path,
) -> dict:
    """Make one fp32/fp16/bf16 variant for the workflow and write its record beside it."""
    spec = cfg.models[model]
    options = options_from_config(precision, spec.calibration)
    logger.info("%s %s: making %s variant of %s", model, precision, precision, src)
    info = make_variant(Path(src), Path(dst), options, calib=None, log=logger.warning)
    info["calibration_images"] = 0
    write_json(record, info)
    logger.info("%s %s: done in %.2f s", model, precision, info["wall_s"])
    return info


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


def run_rule(cfg, job) -> None:
    """Rule `precision`: the fp32 copy, or fp16/bf16 by AutoCast."""
    w = job.wildcards
    variant_for_rule(cfg, w.model, w.precision, job.input[0], job.output.onnx, job.output.record)
