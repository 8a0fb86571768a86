"""Stage `sensitivity`: which regions of a strict int8/fp8/fp16 variant add its error, ranked.

On the calibration split (never the validation split: that stays the held-out gate), with ONNX
Runtime CPU, against the fp32 surgery graph's outputs on the same images (kiln.judge):

1. the strict variant (rule quantize's ONNX, as every device builds it) is judged once;
2. each region, one at a time, is put back in higher precision and the variant judged again.
   A region is one quantized node: a node of the surgery graph (same name) that reads a
   DequantizeLinear output. Putting it back bypasses the Q/DQ pairs on its inputs (activations
   and weights: ModelOpt quantizes weights as Q(fp weight) -> DQ), which is what ModelOpt's
   ``nodes_to_exclude`` of that node does, without one ModelOpt run per node.
   An fp16 variant (AutoCast) is judged on its emulation instead (kiln.fp16_emulation: fp32
   arithmetic, fp16 storage, built from the surgery graph; ONNX Runtime CPU runs fp16 in fp32 and
   drops its Casts): a region is one node the variant computes in fp16, put back by leaving it
   un-rounded in the emulation, as AutoCast's ``nodes_to_exclude`` leaves it fp32;
3. regions are ranked by the error they add (kiln.judge.Judge.judge: 1 - parity score + mAP50
   drop), and the top 1..max_nodes are put back together to estimate how many the mixed variant
   needs (rule fallback confirms it with ModelOpt itself).

Writes results/sensitivity/{model}/opset{N}/{precision}.json and a Markdown table beside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from kiln import fp16_emulation, paths
from kiln.batches import load as load_inputs
from kiln.judge import Judge, brief
from kiln.specs import KilnConfig, base_precision
from kiln.util import atomic_path, write_json

log = logging.getLogger(__name__)

PLUMBING = ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant")
# Where an fp16 table is measured (kiln.fp16_emulation says why not on ONNX Runtime CPU's own fp16).
EMULATION = "onnxruntime CPU, fp16 emulation (fp32 arithmetic, fp16 storage; ORT_DISABLE_ALL)"


def wanted(cfg: KilnConfig) -> list[tuple[str, int, str]]:
    """(model, opset, strict precision) of every table the config asks for: the model's
    `sensitivity.precisions`, and every precision whose mixed variant a device builds."""
    out: dict[tuple[str, int, str], None] = {}
    for name, spec in cfg.models.items():
        for opset in cfg.opsets(name):
            for p in spec.sensitivity.get("precisions", []):
                out[(name, opset, p)] = None
            for p in cfg.precisions(name, opset):
                if p != base_precision(p):
                    out[(name, opset, base_precision(p))] = None
    return list(out)


def targets(cfg: KilnConfig) -> list[str]:
    """The tables rule `all` asks for (JSON and Markdown)."""
    return [paths.fmt(pattern, results=cfg.results, model=m, opset=o, precision=p)
            for m, o, p in wanted(cfg) for pattern in (paths.SENSITIVITY, paths.SENSITIVITY_MD)]


def params(cfg: KilnConfig, model: str, precision: str) -> dict:
    """What changes a table: the gate it measures against, the images, the decode, the limit."""
    spec = cfg.models[model]
    v = cfg.validation
    return {
        "thresholds": v["thresholds"][base_precision(precision)],
        "match_score": v["match_score"],
        "batch_size": v["batch_size"],
        "images": images(spec),
        "max_nodes": spec.sensitivity.get("max_nodes", 8),
        "decode": spec.decode,
    }


def images(spec) -> int:
    """Calibration images the measurement runs on."""
    return spec.sensitivity.get("images") or spec.calibration["images"]


# --------------------------------------------------------------------------- regions of a Q/DQ graph


def block_of(name: str) -> str:
    """A node's block in the surgery graph: its name's first two scopes (/backbone/stage2 of
    /backbone/stage2/stage2.0/conv/Conv); a top-level node is its own block."""
    parts = [p for p in name.split("/") if p]
    return "/" + "/".join(parts[:2]) if len(parts) > 2 else name


def regions(model: onnx.ModelProto) -> list[dict]:
    """Quantized nodes: every compute node that reads a DequantizeLinear output, in graph order."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type in PLUMBING:
            continue
        dq = [i for i in n.input if i in producer and producer[i].op_type == "DequantizeLinear"]
        if dq:
            out.append({"node": n.name, "op_type": n.op_type, "block": block_of(n.name), "quantized_inputs": len(dq)})
    return out


def bypass(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """A copy of `model` where `nodes` read their inputs before quantization: DQ(Q(x)) -> x."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.name not in nodes:
            continue
        for k, i in enumerate(n.input):
            dq = producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
    return m  # Q/DQ nodes nobody reads any more: ONNX Runtime drops them


def rank(judge: Judge, variant: onnx.ModelProto, max_nodes: int, log_=log.info) -> dict:
    """The strict int8/fp8 variant's judgement, each region's, ranked, and the top-k estimate."""
    return rank_regions(judge, regions(variant), lambda kept: bypass(variant, kept), max_nodes, log_=log_)


def rank_fp16(judge: Judge, fp32: onnx.ModelProto, variant: onnx.ModelProto, max_nodes: int, log_=log.info) -> dict:
    """As :func:`rank` for an fp16 variant, judged on its emulation (kiln.fp16_emulation), never on ONNX Runtime
    CPU's fp16, which runs in fp32 and drops the Casts: the strict emulation, then each fp16 region kept fp32."""
    storage = fp16_emulation.fp16_storage(variant)
    found = [{**r, "block": block_of(r["node"])} for r in fp16_emulation.regions(variant, fp32)]
    return rank_regions(judge, found, lambda kept: fp16_emulation.emulate(fp32, storage, kept), max_nodes,
                        optimize=False, log_=log_)


def rank_regions(judge: Judge, found: list[dict], keep, max_nodes: int, optimize: bool = True,
                 log_=log.info) -> dict:
    """Judge `keep(set())` (the strict variant), then `keep({region})` for each region, ranked by the error each
    removes, and the top 1..max_nodes together. `keep(nodes)` is the variant with `nodes` in higher precision."""
    t0 = time.perf_counter()
    strict = judge.measure(keep(set()), optimize)
    rows = []
    for i, r in enumerate(found):
        res = judge.measure(keep({r["node"]}), optimize)
        rows.append({**r, "error_added": round(strict["error"] - res["error"], 9), "kept": brief(res)})
        log_(f"region {i + 1}/{len(found)} {r['node']} ({r['op_type']}): error {res['error']:.4f} "
             f"(strict {strict['error']:.4f}), {res['seconds']:.2f} s")
    rows.sort(key=lambda r: (-r["error_added"], r["node"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    cumulative = []
    estimate = 0 if strict["passed"] else None
    for k in range(1, min(max_nodes, len(rows)) + 1):
        if estimate is not None:
            break
        res = judge.measure(keep({r["node"] for r in rows[:k]}), optimize)
        cumulative.append({"top": k, **brief(res)})
        if res["passed"]:
            estimate = k
    return {
        "strict": brief(strict),
        "reference_accuracy": {k: round(judge.reference_accuracy[k], 4) for k in ("map50_95", "map50")},
        "regions": rows,
        "cumulative": cumulative,
        "estimate": estimate,  # top-k regions that pass the gate together (None: not within max_nodes)
        "max_nodes": max_nodes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def markdown(table: dict, top: int = 20) -> str:
    """The ranked table as Markdown: the strict variant, then the regions that add the most error."""
    s = table["strict"]
    lines = [
        f"# Sensitivity: {table['model']} {table['precision']} (opset {table['opset']})",
        "",
        f"Calibration split, {table['images']} images, {table['runtime']}, against fp32 "
        f"(mAP50 {table['reference_accuracy']['map50']}). Strict {table['precision']}: error {s['error']}, "
        f"match rate {s['match_rate']}, mAP50 drop {s['map50_drop']}, cosine "
        + ", ".join(f"{k} {v}" for k, v in s["cosine"].items())
        + f"; gate {'passed' if s['passed'] else 'failed: ' + '; '.join(s['failures'])}.",
        "",
        f"{len(table['regions'])} {'fp16' if table['precision'] == 'fp16' else 'quantized'} regions, measured in {table['seconds']} s. Estimate: "
        + (f"the top {table['estimate']} kept in higher precision pass the gate."
           if table["estimate"] is not None else f"the top {table['max_nodes']} (max_nodes) do not pass the gate."),
        "",
        "| rank | node | op | block | error added | error kept | match rate | mAP50 drop | seconds |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table["regions"][:top]:
        k = r["kept"]
        lines.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | `{r['block']}` | {r['error_added']:.4f} | "
                     f"{k['error']:.4f} | {k['match_rate']:.3f} | {k['map50_drop']:.4f} | {k['seconds']:.2f} |")
    if len(table["regions"]) > top:
        lines.append(f"\n({len(table['regions']) - top} more in the JSON.)")
    return "\n".join(lines) + "\n"


def measure(cfg: KilnConfig, model: str, opset: int, precision: str, fp32_onnx: Path, variant_onnx: Path,
            calib_npz: Path, annotations: Path, out_json: Path, out_md: Path, threads: int = 0) -> dict:
    """Rank the regions of the strict `precision` variant and write the table (JSON, Markdown)."""
    spec = cfg.models[model]
    p = params(cfg, model, precision)
    data = load_inputs(calib_npz)
    n = min(len(data), p["images"])
    from kiln.batches import Inputs

    inputs = Inputs(data.images[:n], data.image_ids[:n], data.orig_sizes[:n], data.ratios[:n], data.pads[:n])
    t0 = time.perf_counter()
    judge = Judge.on_fp32(fp32_onnx, spec=spec, inputs=inputs, annotations=Path(annotations),
                          thresholds=p["thresholds"], match_score=p["match_score"], batch_size=p["batch_size"],
                          threads=threads)
    log.info("sensitivity %s %s: fp32 reference on %d calibration images", model, precision, n)
    table = {"model": model, "opset": opset, "precision": precision, "split": "calib", "images": n,
             "variant": str(variant_onnx), "reference": str(fp32_onnx), "runtime": "onnxruntime CPU",
             "thresholds": p["thresholds"]}
    variant = onnx.load(str(variant_onnx))
    if precision == "fp16":
        table["runtime"] = EMULATION
        table.update(rank_fp16(judge, onnx.load(str(fp32_onnx)), variant, p["max_nodes"]))
    else:
        table.update(rank(judge, variant, p["max_nodes"]))
    table["wall_s"] = round(time.perf_counter() - t0, 3)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown(table))
    write_json(out_json, table)  # last: the JSON is the rule's first output, the one that says it finished
    log.info("sensitivity %s %s: %d regions in %.1f s, estimate %s", model, precision, len(table["regions"]),
             table["wall_s"], table["estimate"])
    return table


def run_rule(cfg, job) -> None:
    """Rule `sensitivity`: the ranked regions of one strict variant on the calibration split."""
    w, i, o = job.wildcards, job.input, job.output
    measure(cfg, w.model, int(w.opset), w.precision, i.fp32, i.variant, i.calib, i.annotations, o.json, o.md,
            threads=job.threads)
