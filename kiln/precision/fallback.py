"""Rule ``fallback``: the mixed variant of a strict int8/fp8/fp16 one (``int8-mixed``, ``fp8-mixed``, ``fp16-mixed``).

It keeps the fewest, most sensitive regions in higher precision: the first k nodes of the
sensitivity table (kiln/sensitivity.py, rule ``sensitivity``) go to ModelOpt's own
``nodes_to_exclude`` on top of the model's calibration block, and the variant is made by rule
quantize's code (kiln.precision.quantize), then judged on the calibration split (kiln.judge).
``fp16-mixed`` is made by rule precision's AutoCast (kiln.precision.castvariant) with the kept nodes in
fp32, and each try is judged on its fp16 emulation (kiln.fp16_emulation: fp32 arithmetic, fp16
storage), not on ONNX Runtime CPU's own fp16, which runs in fp32.
k starts at the table's estimate and grows until the gate passes there or a limit is reached:
``models.<m>.sensitivity.max_nodes``, or ``max_latency_loss`` (the latency given up against the strict
variant, timed on this host's CPU: an estimate; each device's summary row has its own figure). The strict variant stays as it was, beside it.

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

import onnx

from kiln import fp16_emulation
from kiln.batches import Inputs
from kiln.batches import load as load_inputs
from kiln.judge import Judge, brief, session
from kiln.latency import measure
from kiln.precision.castvariant import make_variant as autocast_variant
from kiln.precision.options import options_from_config, params
from kiln.precision.ptq import make_variant
from kiln.precision.variant import atomic_copy
from kiln.specs import base_precision
from kiln.util import read_json, scratch_dir, write_json

logger = logging.getLogger("kiln.precision")


# Rule fallback can time only the host it runs on: ONNX Runtime CPU, batch 1, short fixed settings. Enough to
# tell a variant that gives up much latency from one that does not; each device's own figure is its summary row's.
CPU_TIMING = {"warmup_ms": 100.0, "min_iterations": 20, "min_seconds": 0.5}
CPU_NOTE = ("CPU-host estimates: ONNX Runtime CPU at batch 1 on the host that ran rule fallback, not the device; "
            "each device's summary row has the latency its mixed engine gave up there (latency_given_up)")

JUDGED_ON_FP16 = "fp16 emulation (fp32 arithmetic, fp16 storage) on onnxruntime CPU, kiln.fp16_emulation"


def cpu_median_ms(onnx_path: Path, feeds: dict, threads: int = 0) -> float:
    """Median latency (ms) of one batch-1 query of `onnx_path` with ONNX Runtime CPU (kiln.latency.measure)."""
    sess = session(onnx_path, threads)
    names = [o.name for o in sess.get_outputs()]
    return measure(lambda: sess.run(names, feeds), 1, cv_warn_percent=100.0, **CPU_TIMING).median_ms


def make_mixed(cfg, model: str, precision: str, src: Path, dst: Path, record: Path, calib_npz: Path,
               annotations: Path, table_json: Path, threads: int = 0, strict_onnx: Path | None = None) -> dict:
    """Make the mixed variant of `precision` (int8-mixed) at `dst`, its record at `record`.

    With ``sensitivity.max_latency_loss`` set, the strict variant `strict_onnx` and each try are timed on this
    host's CPU (:func:`cpu_median_ms`); a try slower than the strict one by more than the limit stops the search
    and the last try within the limit is the variant (the first try, flagged, when none is)."""
    t0 = time.perf_counter()
    spec = cfg.models[model]
    p = params(cfg, model, precision)
    base = base_precision(precision)
    table = read_json(table_json)
    ranked = [r for r in table["regions"] if r["error_added"] > 0]  # a region that adds nothing never helps
    limit = min(p["max_nodes"], len(ranked))
    max_loss = p.get("max_latency_loss")

    data = load_inputs(calib_npz)
    calib = data.feeds(spec, 0, min(len(data), spec.calibration["images"]))
    n = min(len(data), p["images"])
    inputs = Inputs(data.images[:n], data.image_ids[:n], data.orig_sizes[:n], data.ratios[:n], data.pads[:n])
    judge = Judge.on_fp32(src, spec=spec, inputs=inputs, annotations=Path(annotations), thresholds=p["thresholds"],
                          match_score=p["match_score"], batch_size=p["batch_size"], threads=threads)
    strict = options_from_config(base, spec.calibration)  # the strict variant's options
    emulated = base == "fp16"
    fp32_model = onnx.load(str(src)) if emulated else None

    def make_try(out: Path, options) -> dict:
        if emulated:  # as rule precision makes fp16: AutoCast's range check on random data, no calibration
            return autocast_variant(Path(src), out, options, calib=None, log=logger.warning)
        return make_variant(Path(src), out, options, calib=calib, log=logger.warning)

    def judge_try(out: Path) -> dict:
        if emulated:  # the try's own fp16 tensors rounded in the fp32 graph: its kept nodes stay fp32
            storage = fp16_emulation.fp16_storage(onnx.load(str(out)))
            return judge.measure(fp16_emulation.emulate(fp32_model, storage), optimize=False)
        return judge.measure(out)

    tries: list[dict] = []
    made: list[tuple[int, Path, dict, dict]] = []  # (k, file, make_variant's info, judgement) of each try
    k = 0 if table["strict"]["passed"] else min(max(table.get("estimate") or 1, 1), limit)
    timing = max_loss is not None and k > 0
    if timing and strict_onnx is None:
        raise ValueError("max_latency_loss needs the strict variant to time against (strict_onnx)")
    one = data.feeds(spec, 0, 1) if timing else None
    strict_ms = cpu_median_ms(Path(strict_onnx), one, threads) if timing else None
    stopped_by = None
    with scratch_dir(dst) as work:
        while True:
            options = dataclasses.replace(
                strict, nodes_to_exclude=(*strict.nodes_to_exclude, *(re.escape(r["node"]) for r in ranked[:k])))
            out = work / f"top{k}.onnx"
            info = make_try(out, options)
            res = judge_try(out)
            entry = {"kept": k, **brief(res)}
            if timing:
                ms = cpu_median_ms(out, one, threads)
                entry.update(cpu_median_ms=round(ms, 3), cpu_latency_loss=round(ms / strict_ms - 1.0, 4))
            tries.append(entry)
            made.append((k, out, info, entry))
            logger.info("%s %s: %d kept, error %.4f, %s%s", model, precision, k, res["error"],
                        "passed" if res["passed"] else "; ".join(res["failures"]),
                        f", CPU latency {entry['cpu_latency_loss']:+.1%} against strict" if timing else "")
            if timing and entry["cpu_latency_loss"] > max_loss:
                stopped_by = "max_latency_loss"
                break
            if res["passed"]:
                stopped_by = "gate passed" if k else "strict passes"
                break
            if k >= limit:
                stopped_by = "max_nodes"
                break
            k += 1
        # The variant: the last try, or with the latency limit hit the try before it (the last within the limit).
        chosen = made[-2] if stopped_by == "max_latency_loss" and len(made) > 1 else made[-1]
        k, out, info, entry = chosen
        atomic_copy(out, Path(dst))
    kept = ranked[:k]
    info["dst"] = str(dst)
    info["precision"] = precision
    info["calibration_images"] = 0 if emulated else len(calib["images"])
    passed = entry["passed"]
    higher = "fp16" if base in ("int8", "fp8") else "fp32"
    within = not timing or entry["cpu_latency_loss"] <= max_loss
    if stopped_by == "max_latency_loss":
        over = tries[-1]
        why = (f"{len(kept)} kept in {higher}: keeping {over['kept']} would give up {over['cpu_latency_loss']:.1%} "
               f"CPU latency against strict {base}, over models.{model}.sensitivity.max_latency_loss {max_loss}"
               + ("" if within else f" (even {len(kept)} gives up {entry['cpu_latency_loss']:.1%}: no try is within it)")
               + ("; the gate passes on the calibration split" if passed else
                  "; the gate still fails on the calibration split: " + "; ".join(entry["failures"])))
    elif passed:
        why = ("the strict variant already passes the gate on the calibration split: nothing kept" if not kept else
               f"the {len(kept)} region{'s' if len(kept) > 1 else ''} adding the most error in the sensitivity table, "
               f"kept in {higher} (ModelOpt {'AutoCast ' if emulated else ''}nodes_to_exclude): with them the gate passes on the calibration split")
    else:
        why = (f"the gate still fails on the calibration split with {len(kept)} regions kept, the limit "
               f"(models.{model}.sensitivity.max_nodes {p['max_nodes']}, or every region that adds error): "
               + "; ".join(entry["failures"]))
    if emulated:
        why += f"; judged on the {JUDGED_ON_FP16}"
    info["fallback"] = {
        "strict": base,
        "sensitivity": str(table_json),
        "split": "calib",
        "max_nodes": p["max_nodes"],
        "max_latency_loss": max_loss,
        # Which limit ended the search: "gate passed", "strict passes" (nothing kept), "max_nodes" or
        # "max_latency_loss".
        "stopped_by": stopped_by,
        "passed_on_calib": passed,
        "kept": [{"node": r["node"], "op_type": r["op_type"], "block": r["block"], "rank": r["rank"],
                  "error_added": r["error_added"]} for r in kept],
        "why": why,
        "judged_on": JUDGED_ON_FP16 if emulated else "onnxruntime CPU",
        "strict_on_calib": table["strict"],
        "tries": tries,
    }
    if timing:
        info["fallback"]["cpu_latency"] = {
            "note": CPU_NOTE, **CPU_TIMING, "strict_median_ms": round(strict_ms, 3),
            "median_ms": entry["cpu_median_ms"], "loss": entry["cpu_latency_loss"], "within_limit": within}
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    write_json(record, info)
    logger.info("%s %s: %d nodes kept, %s on the calibration split, stopped by %s, %.1f s", model, precision,
                len(kept), "passed" if passed else "failed", stopped_by, info["wall_s"])
    return info


def run_rule(cfg, job) -> None:
    """Rule `fallback`: the mixed variant, from the fp32 surgery graph and the sensitivity table."""
    w, i, o = job.wildcards, job.input, job.output
    make_mixed(cfg, w.model, w.precision, Path(i.onnx), Path(o.onnx), Path(o.record), Path(i.calib),
               Path(i.annotations), Path(i.sensitivity), threads=job.threads, strict_onnx=Path(i.strict))
