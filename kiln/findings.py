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


def describe_check(check: dict | None) -> str | None:
    """A validation's weakest parity check (kiln.validate.parity.weakest) as the summary and the page show it:
    "scores 0.9699", "detections match rate 0.9500"; None where the validation recorded none."""
    if not check:
        return None
    name = check["part"] if check["part"] != "detections" else f"detections {check['metric'].replace('_', ' ')}"
    return f"{name} {check['value']:.4f}"
