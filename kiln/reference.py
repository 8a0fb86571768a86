"""Stage `reference`: fp32 ONNX Runtime outputs on the validation inputs, the ground truth for parity."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from kiln import integrity
from kiln.batches import load as load_inputs
from kiln.batches import run_batches
from kiln.specs import KilnConfig
from kiln.util import atomic_path, sha256, write_json

log = logging.getLogger(__name__)
REFERENCE_PROVIDER = "CPUExecutionProvider"  # the reference must not depend on a GPU


def params(cfg: KilnConfig, model: str) -> dict:
    return {"batch_size": cfg.validation["batch_size"], "decode": cfg.models[model].decode}


def make_reference(
    cfg: KilnConfig, model: str, onnx_path: Path, inputs_npz: Path, annotations: Path, out_npz: Path, record: Path
) -> dict:
    """Run the fp32 ONNX on the CPU provider (the reference must not depend on a GPU) and score it."""
    import onnxruntime as ort

    from kiln.accuracy import check_classes, task_map
    from kiln.backends.onnxruntime import OrtRunner

    spec = cfg.models[model]
    check_classes(spec, onnx_path, annotations)
    inputs = load_inputs(inputs_npz)
    runner = OrtRunner(onnx_path, providers=[REFERENCE_PROVIDER], optimize=True)
    t0 = time.perf_counter()
    outputs = run_batches(runner.infer, spec, inputs, cfg.validation["batch_size"])
    seconds = time.perf_counter() - t0
    with atomic_path(out_npz, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **outputs)
    accuracy = task_map(spec, outputs, inputs, annotations)
    info = {
        "model": model,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256(onnx_path),
        "runtime": f"onnxruntime {ort.__version__} {REFERENCE_PROVIDER}",
        "images": len(inputs),
        "seconds": round(seconds, 3),
        "accuracy": accuracy,
        # What validation checks outputs.npz against before using it (kiln/integrity.py).
        "outputs_sha256": sha256(out_npz),
        "outputs_bytes": Path(out_npz).stat().st_size,
        "outputs_stamp": integrity.stamp(out_npz),
    }
    write_json(record, info)
    log.info("reference %s: mAP50-95 %.4f mAP50 %.4f", model, accuracy["map50_95"], accuracy["map50"])
    return info


def run_rule(cfg, job) -> None:
    """Rule `reference`: fp32 outputs on the validation inputs, and their mAP."""
    i, o = job.input, job.output
    make_reference(cfg, job.wildcards.model, i.onnx, i.inputs, i.annotations, o.outputs, o.record)
