"""Rule ``quantize``: int8/fp8 variants by ModelOpt ONNX PTQ, and the list of calibration images.

PTQ (``modelopt.onnx.quantization.quantize``) calibrates on the ONNX Runtime CPU provider and
inserts explicit QuantizeLinear/DequantizeLinear pairs (opset >= 19) with fp32 elsewhere; a second
pass, AutoCast (kiln.precision.cast), then lowers everything not quantized to
``HIGH_PRECISION_DTYPE``, keeping the output Sigmoids and score tail fp32 by node name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.precision.cast import autocast
from kiln.precision.graph import anchor, first_samples
from kiln.precision.modelopt_log import Capture
from kiln.precision.options import (
    AUTOCAST_REFERENCE_SAMPLES,
    HIGH_PRECISION_DTYPE,
    QUANT_PRECISIONS,
    PrecisionOptions,
    options_from_config,
)
from kiln.precision.variant import Conversion, make
from kiln.util import atomic_path, write_json

RULE_PRECISIONS = QUANT_PRECISIONS  # what rule quantize makes

# The package's name, as before it was split in modules: the rule's log lines read the same.
logger = logging.getLogger("kiln.precision")


def variant_for_rule(
    cfg,
    model: str,
    precision: str,
    src: str | Path,
    dst: str | Path,
    record: str | Path,
    calib_npz: str | Path,
    calib_list: str | Path,
    annotations: str | Path | None = None,
) -> dict:
    """Make one int8/fp8 variant for the workflow: calibration data from the preprocessed calib split.

    The record goes beside the variant, then ``calib_list``: the calibration images' file names.
    `annotations` is the calib split's annotations.json as the rule was given it (a local copy
    under a storage provider); by default the artifact path under cfg.results.
    """
    from kiln.batches import load as load_inputs

    spec = cfg.models[model]
    options = options_from_config(precision, spec.calibration)
    data = load_inputs(calib_npz)
    n = min(len(data), spec.calibration["images"])
    calib = data.feeds(spec, 0, n)
    names = _calib_file_names(cfg, spec, data.image_ids[:n], annotations)
    logger.info("%s %s: making %s variant of %s", model, precision, precision, src)
    info = make_variant(Path(src), Path(dst), options, calib=calib, log=logger.warning)
    info["calibration_images"] = len(calib["images"]) if calib else 0
    write_json(record, info)
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


def run_rule(cfg, job) -> None:
    """Rule `quantize`: int8/fp8 Q/DQ by ModelOpt PTQ on the calibration split."""
    w = job.wildcards
    variant_for_rule(cfg, w.model, w.precision, job.input.onnx, job.output.onnx, job.output.record,
                     calib_npz=job.input.calib, calib_list=job.output.calib_list, annotations=job.input.annotations)
