"""Rule ``quantize``: int8/fp8 variants by ModelOpt ONNX PTQ, and the list of calibration images.

PTQ (``modelopt.onnx.quantization.quantize``) calibrates on the ONNX Runtime CPU provider and
inserts explicit QuantizeLinear/DequantizeLinear pairs (opset >= 19) with fp32 elsewhere; a second
pass, AutoCast (kiln.precision.cast), then lowers everything not quantized to
``HIGH_PRECISION_DTYPE``, keeping the output Sigmoids and score tail fp32 by node name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.precision.options import (
    QUANT_PRECISIONS,
    options_from_config,
)
from kiln.precision.ptq import make_variant
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


def run_rule(cfg, job) -> None:
    """Rule `quantize`: int8/fp8 Q/DQ by ModelOpt PTQ on the calibration split."""
    w = job.wildcards
    variant_for_rule(cfg, w.model, w.precision, job.input.onnx, job.output.onnx, job.output.record,
                     calib_npz=job.input.calib, calib_list=job.output.calib_list, annotations=job.input.annotations)
