"""Stage `diagnose`: a failed build reduced to its smallest failing subgraph, by the device's backend.

The backends whose failures can be diagnosed say so (``Backend.diagnoses``); the TensorRT ones reduce
the model with Polygraphy (kiln/backends/trt/diagnose.py). A build that succeeded gives
``{"status": "not needed"}`` at once. Every fp32/fp16/bf16 record also says whether the build had TF32 on
(``tf32``) and, where it did, the ``suggestion`` to turn it off should the engine fail parity
(kiln.findings.tf32_build, which the summary's hint quotes). The summary's ``diagnosis`` column reads the records; a reason
in them is one line.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from kiln import backends, findings, integrity, paths
from kiln.errors import KilnError
from kiln.specs import base_precision
from kiln.util import read_json, write_json

log = logging.getLogger(__name__)


def targets(cfg, can_build: dict[str, str | None]) -> list[str]:
    """One diagnosis per job of a device whose backend diagnoses failed builds, that this run builds."""
    return [paths.fmt(paths.DIAGNOSIS, results=cfg.results, device=d, model=m, precision=p)
            for d, m, p in cfg.jobs() if can_build.get(d) is None and backends.get(cfg.devices[d].backend).diagnoses]


def params(cfg, device: str, model: str, precision: str) -> dict:
    """The build's own tracked settings, and which engine."""
    build = backends.engine_params(cfg.devices[device], cfg.validation["batch_size"])
    return {"build": build, "precision": precision, "model": model}


def run_rule(cfg, job) -> dict:
    """Rule `diagnose`: one build's diagnosis."""
    w, i = job.wildcards, job.input
    return diagnose_build(cfg, w.device, w.model, w.precision, i.engine, i.onnx, job.output[0])


def diagnose_build(cfg, device: str, model: str, precision: str, engine_record: Path, onnx_path: Path,
                   out: Path) -> dict:
    """Diagnose a failed build, or record that none is needed.

    The ONNX reduced must be the one the engine record says was built (kiln/integrity.py).
    """
    rec = read_json(engine_record)
    integrity.check(integrity.onnx_problem(rec, engine_record, onnx_path))
    # An fp32/fp16/bf16 engine that fails parity later: whether its build had TF32 on, and the fix (kiln.findings).
    tf32 = findings.tf32_build(base_precision(precision), device, rec) or {}
    if rec.get("status") == "built":
        result = {"device": device, "model": model, "precision": precision, "status": "not needed", **tf32}
        write_json(out, result)
        return result
    d = cfg.devices[device]
    try:
        result = backends.get(d.backend).diagnose(onnx_path, d, base_precision(precision), out, spec=cfg.models[model])
        if tf32:
            result.update(tf32)
            write_json(out, result)
        return result
    except (KilnError, subprocess.TimeoutExpired) as err:  # the summary keeps the build's own reason then
        reason = " ".join(str(err).split())  # one line: the summary's CSV and Markdown rows repeat it
        result = {"device": device, "model": model, "precision": precision, "status": "failed",
                  "reason": reason, "build_reason": rec.get("reason"), **tf32}
        write_json(out, result)
        log.warning("diagnose %s/%s/%s could not reduce the model: %s", device, model, precision, reason)
        return result
