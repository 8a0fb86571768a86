"""What a precision variant is asked to be: the precisions, calibration methods and PrecisionOptions.

Imports nothing of Kiln; every other module of the package builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def params(cfg, model: str, precision: str) -> dict:
    """What changes a variant's bytes (tracked by Snakemake): the calibration block for int8/fp8; for
    a mixed variant (int8-mixed, kiln.precision.fallback) also the gate it must pass and its limits (nodes, latency)."""
    if precision.endswith("-mixed"):
        spec, base = cfg.models[model], precision.removesuffix("-mixed")
        return {"precision": precision, "calibration": dict(spec.calibration),
                "thresholds": cfg.validation["thresholds"][base], "match_score": cfg.validation["match_score"],
                "batch_size": cfg.validation["batch_size"], "max_nodes": spec.sensitivity.get("max_nodes", 8),
                "max_latency_loss": spec.sensitivity.get("max_latency_loss"),
                "images": spec.sensitivity.get("images") or spec.calibration["images"]}
    if precision in QUANT_PRECISIONS:
        return {"precision": precision, "calibration": dict(cfg.models[model].calibration)}
    return {"precision": precision}
