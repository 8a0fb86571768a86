"""What a summary row says beyond its numbers: its status words and its flags. Shared by the summary and the page."""

from __future__ import annotations

# A row's status: validated within every gate or not, built here but not validated, not built here, or
# neither passed nor failed because its validation is not there or no longer matches its files.
STALE, MISSING = "stale", "missing"
# Validated, but its reference shows nothing to compare with (no detections, or an mAP below
# validation.min_reference_map, as with random weights): neither passed nor failed.
NOT_MEASURABLE = "not measurable"


def latency_notes(validation: dict | None) -> list[str]:
    """The latency warnings validation recorded, per batch size: a coefficient of variation above
    `validation.latency.cv_warn_percent`, the one threshold (kiln.latency applies it). The
    summary's `flags` and the page's measurement notes both come from here."""
    return [f"batch {lat['batch_size']}: {lat['warning']}"
            for lat in (validation or {}).get("latency") or [] if lat.get("warning")]


# A lower precision is worth deploying only where it is faster than the one above it on that device.
HIGHER = {"fp16": "fp32", "bf16": "fp32", "int8": "fp16", "fp8": "fp16", "int8-mixed": "fp16", "fp8-mixed": "fp16",
          "fp16-mixed": "fp32"}


def _key(row: dict) -> tuple[str, str]:
    return row["model"], row["device"]


def _latency(row: dict) -> float | None:
    return row.get("latency_median_ms") if row.get("status") in ("passed", "failed") else None


def not_faster(rows: list[dict]) -> dict[tuple[str, str, str], str]:
    """(model, device, precision) -> the plain words where it is not faster than the precision above it.

    int8 (and int8-mixed, fp8) against fp16, fp16/bf16 against fp32, at the rows' batch size, where both
    were measured; fp32 stands in for a missing fp16."""
    by = {(r["model"], r["device"], r["precision"]): r for r in rows}
    out = {}
    for r in rows:
        higher = HIGHER.get(r["precision"])
        other = by.get((r["model"], r["device"], higher)) or (by.get((r["model"], r["device"], "fp32"))
                                                               if higher == "fp16" else None)
        mine, theirs = _latency(r), _latency(other) if other else None
        if mine is None or theirs is None or mine < theirs:
            continue
        out[(r["model"], r["device"], r["precision"])] = (
            f"{r['precision']} is not faster than {other['precision']} on {r['device']} "
            f"({mine:.2f} ms against {theirs:.2f} ms median at batch {r.get('batch_size')})")
    return out


def latency_given_up(rows: list[dict], limits: dict[str, float | None] | None = None) -> dict[tuple[str, str, str], dict]:
    """(model, device, mixed precision) -> the latency its engine gave up against the strict one on that device.

    `loss` = mixed p50 / strict p50 - 1 at batch 1, where both rows were measured there; `over` where it exceeds
    the model's `sensitivity.max_latency_loss` (`limits`: model -> fraction or None), with the words to flag it."""
    by = {(r["model"], r["device"], r["precision"]): r for r in rows}
    out = {}
    for r in rows:
        strict = r["precision"].removesuffix("-mixed")
        if strict == r["precision"] or (other := by.get((r["model"], r["device"], strict))) is None:
            continue
        mine, theirs = _latency(r), _latency(other)
        if mine is None or not theirs or r.get("batch_size") != 1 or other.get("batch_size") != 1:
            continue
        loss = mine / theirs - 1.0
        limit = (limits or {}).get(r["model"])
        over = limit is not None and loss > limit
        out[_key(r) + (r["precision"],)] = {
            "loss": round(loss, 4), "limit": limit, "over": over,
            "note": (f"{r['precision']} gives up {loss:.1%} latency against {strict} on {r['device']} ({mine:.2f} ms "
                     f"against {theirs:.2f} ms median at batch 1)"
                     + (f", over models.{r['model']}.sensitivity.max_latency_loss {limit}" if over else "")),
        }
    return out


def pareto(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per model x device: the rows no other row beats on both latency (lower) and mAP50-95 (higher)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if _latency(r) is not None and r.get("map50_95") is not None:
            groups.setdefault(_key(r), []).append(r)
    front = {}
    for key, rs in groups.items():
        front[key] = sorted(
            (r for r in rs if not any(_latency(o) <= _latency(r) and o["map50_95"] >= r["map50_95"]
                                      and (_latency(o) < _latency(r) or o["map50_95"] > r["map50_95"]) for o in rs)),
            key=_latency)
    return front


def deploy(rows: list[dict], limits: dict[str, float | None] | None = None) -> list[dict]:
    """Per model x device: the fastest engine that passes every gate, the Pareto front of latency
    against mAP50-95, where a lower precision is not faster than the higher one, and the latency each
    mixed variant gave up against its strict one (`limits`: as :func:`latency_given_up`)."""
    slow = not_faster(rows)
    given_up = latency_given_up(rows, limits)
    front = pareto(rows)
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        passed = [r for r in rows if _key(r) == key and r["status"] == "passed" and _latency(r) is not None]
        best = min(passed, key=_latency) if passed else None
        out.append({
            "model": key[0], "device": key[1],
            "deploy": best["precision"] if best else None,
            "latency_median_ms": _latency(best) if best else None,
            "map50_95": best["map50_95"] if best else None,
            "why": (f"fastest of the {len(passed)} engines that pass every gate" if best
                    else _none_why([r for r in rows if _key(r) == key])),
            "pareto": [{"precision": r["precision"], "latency_median_ms": _latency(r), "map50_95": r["map50_95"],
                        "status": r["status"]} for r in front.get(key, [])],
            "not_faster": [v for (m, d, _p), v in slow.items() if (m, d) == key],
            "latency_given_up": [{"precision": p, **v} for (m, d, p), v in given_up.items() if (m, d) == key],
        })
    return out


def sensitivity_hint(row: dict, precisions: tuple[str, ...]) -> str | None:
    """For a failing strict int8/fp8 row: the config keys that find where it loses accuracy and win it back."""
    p = row["precision"]
    if row.get("status") != "failed" or p not in ("int8", "fp8") or str(row.get("reason", "")).startswith("build"):
        return None
    mixed = f"{p}-mixed"
    tail = ("" if mixed not in precisions else f"; {mixed} on this device is its mixed variant")
    return (f"kiln: to rank the regions that lose accuracy set models.{row['model']}.sensitivity.precisions: [{p}] "
            f"(results/sensitivity/); to keep them in higher precision add {mixed} to "
            f"devices.{row['device']}.precisions{tail}")


TF32_PRECISIONS = ("fp32", "fp16", "bf16")  # the precisions whose fp32 layers TF32 rounds


def tf32_build(precision: str, device: str, engine_record: dict | None) -> dict | None:
    """For an fp32/fp16/bf16 engine record: whether the build had TF32 on (engine.json options.tf32), and where
    it did, the suggestion to turn it off should the engine fail parity. None for other precisions or records
    without the option (ONNX Runtime). The diagnose stage records it; the summary's hint quotes it for failing rows.

    TF32 rounds fp32 matmul and convolution inputs to 10 mantissa bits; DETR-family models lose parity to it
    (Peterande/D-FINE #44)."""
    tf32 = ((engine_record or {}).get("options") or {}).get("tf32")
    if precision not in TF32_PRECISIONS or tf32 is None:
        return None
    return {"tf32": bool(tf32), "suggestion": (
        f"kiln: this engine was built with TF32 on (engine.json options.tf32: true), which rounds fp32 layers' "
        f"inputs to 10 mantissa bits: set devices.{device}.tf32: false and rebuild") if tf32 else None}


def tf32_hint(row: dict, engine_record: dict | None) -> str | None:
    """For a failing fp32/fp16/bf16 engine built with TF32 on: turn it off (:func:`tf32_build`)."""
    if row.get("status") != "failed":
        return None
    return (tf32_build(row["precision"], row["device"], engine_record) or {}).get("suggestion")


def describe_check(check: dict | None) -> str | None:
    """A validation's weakest parity check (kiln.validate.parity.weakest) as the summary and the page show it:
    "scores 0.9699", "detections match rate 0.9500"; None where the validation recorded none."""
    if not check:
        return None
    name = check["part"] if check["part"] != "detections" else f"detections {check['metric'].replace('_', ' ')}"
    return f"{name} {check['value']:.4f}"


def _none_why(rows: list[dict]) -> str:
    """Why a device has no engine to deploy: none passed, or none was validated where the summary ran."""
    if any(r["status"] in ("passed", "failed", NOT_MEASURABLE) for r in rows):
        return "no engine of this model passes every gate on this device"
    statuses = ", ".join(sorted({r["status"] for r in rows}))
    return f"not validated on this host: no engine of this model was measured here (rows: {statuses})"

