"""Rule ``fallback``: the mixed variant of a strict int8/fp8 one (``int8-mixed``, ``fp8-mixed``).

It keeps the fewest, most sensitive regions in higher precision: the first k nodes of the
sensitivity table (kiln/sensitivity.py, rule ``sensitivity``) go to ModelOpt's own
``nodes_to_exclude`` on top of the model's calibration block, and the variant is made by rule
quantize's code (kiln.precision.quantize), then judged on the calibration split (kiln.judge).
k starts at the table's estimate and grows until the gate passes there or
``models.<m>.sensitivity.max_nodes`` is reached. The strict variant stays as it was, beside it.

The record (``int8-mixed.json``) is the quantize record plus ``fallback``: what was kept, each
node's rank and the error it added, every try, and whether the gate passed on the calibration
split (the validation gate, on the device, is still the judge of the engine).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

from kiln.batches import Inputs
from kiln.batches import load as load_inputs
from kiln.judge import Judge, brief
from kiln.precision.options import options_from_config, params
from kiln.precision.ptq import make_variant
from kiln.precision.variant import atomic_copy
from kiln.specs import base_precision
from kiln.util import read_json, scratch_dir, write_json

logger = logging.getLogger("kiln.precision")


def make_mixed(cfg, model: str, precision: str, src: Path, dst: Path, record: Path, calib_npz: Path,
               annotations: Path, table_json: Path, threads: int = 0) -> dict:
    """Make the mixed variant of `precision` (int8-mixed) at `dst`, its record at `record`."""
    t0 = time.perf_counter()
    spec = cfg.models[model]
    p = params(cfg, model, precision)
    base = base_precision(precision)
    table = read_json(table_json)
    ranked = [r for r in table["regions"] if r["error_added"] > 0]  # a region that adds nothing never helps
    limit = min(p["max_nodes"], len(ranked))

    data = load_inputs(calib_npz)
    calib = data.feeds(spec, 0, min(len(data), spec.calibration["images"]))
    n = min(len(data), p["images"])
    inputs = Inputs(data.images[:n], data.image_ids[:n], data.orig_sizes[:n], data.ratios[:n], data.pads[:n])
    judge = Judge.on_fp32(src, spec=spec, inputs=inputs, annotations=Path(annotations), thresholds=p["thresholds"],
                          match_score=p["match_score"], batch_size=p["batch_size"], threads=threads)
    strict = options_from_config(base, spec.calibration)  # the strict variant's options

    tries: list[dict] = []
    k = 0 if table["strict"]["passed"] else min(max(table.get("estimate") or 1, 1), limit)
    with scratch_dir(dst) as work:
        while True:
            kept = ranked[:k]
            options = dataclasses.replace(
                strict, nodes_to_exclude=(*strict.nodes_to_exclude, *(re.escape(r["node"]) for r in kept)))
            out = work / f"top{k}.onnx"
            info = make_variant(Path(src), out, options, calib=calib, log=logger.warning)
            res = judge.measure(out)
            tries.append({"kept": k, **brief(res)})
            logger.info("%s %s: %d kept, error %.4f, %s", model, precision, k, res["error"],
                        "passed" if res["passed"] else "; ".join(res["failures"]))
            if res["passed"] or k >= limit:
                break
            k += 1
        atomic_copy(out, Path(dst))  # the last try is the variant
    info["dst"] = str(dst)
    info["precision"] = precision
    info["calibration_images"] = len(calib["images"])
    passed = tries[-1]["passed"]
    info["fallback"] = {
        "strict": base,
        "sensitivity": str(table_json),
        "split": "calib",
        "max_nodes": p["max_nodes"],
        "passed_on_calib": passed,
        "kept": [{"node": r["node"], "op_type": r["op_type"], "block": r["block"], "rank": r["rank"],
                  "error_added": r["error_added"]} for r in kept],
        "why": (("the strict variant already passes the gate on the calibration split: nothing kept"
                 if not kept else
                 f"the {len(kept)} region{'s' if len(kept) > 1 else ''} adding the most error in the sensitivity table, kept in "
                 f"{'fp16' if base in ('int8', 'fp8') else 'fp32'} (ModelOpt nodes_to_exclude): with them the "
                 f"gate passes on the calibration split") if passed else
                f"the gate still fails on the calibration split with {len(kept)} regions kept, the limit "
                f"(models.{model}.sensitivity.max_nodes {p['max_nodes']}, or every region that adds error): "
                + "; ".join(tries[-1]["failures"])),
        "strict_on_calib": table["strict"],
        "tries": tries,
    }
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    write_json(record, info)
    logger.info("%s %s: %d nodes kept, %s on the calibration split, %.1f s", model, precision, len(kept),
                "passed" if passed else "failed", info["wall_s"])
    return info


def run_rule(cfg, job) -> None:
    """Rule `fallback`: the mixed variant, from the fp32 surgery graph and the sensitivity table."""
    w, i, o = job.wildcards, job.input, job.output
    make_mixed(cfg, w.model, w.precision, Path(i.onnx), Path(o.onnx), Path(o.record), Path(i.calib),
               Path(i.annotations), Path(i.sensitivity), threads=job.threads)
