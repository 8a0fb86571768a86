"""Rule ``precision``: the fp32 copy (kiln.precision.variant) and fp16/bf16 variants by ModelOpt AutoCast.

AutoCast (``convert_to_mixed_precision``) keeps in fp32 the nodes whose reference activations
exceed +-512 (where fp16's step is already 0.5), inserts Cast nodes at the borders and keeps graph
IO fp32 (``keep_io_types``). bf16 needs opset 22; AutoCast raises it. The range check runs on a few
calibration samples when given, else on random data.

The conversion itself is kiln/precision/castvariant.py, which the fp16-mixed fallback runs too; AutoCast
is also the second pass of rule ``quantize`` (through kiln/precision/ptq.py). This module imports nothing
of quantization.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.precision.castvariant import RULE_PRECISIONS, make_variant
from kiln.precision.options import options_from_config
from kiln.util import write_json

__all__ = ["RULE_PRECISIONS", "make_variant", "run_rule", "variant_for_rule"]

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


def run_rule(cfg, job) -> None:
    """Rule `precision`: the fp32 copy, or fp16/bf16 by AutoCast."""
    w = job.wildcards
    variant_for_rule(cfg, w.model, w.precision, job.input[0], job.output.onnx, job.output.record)
