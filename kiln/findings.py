"""What a summary row says beyond its numbers: its status words and its flags. Shared by the summary and the page."""

from __future__ import annotations

# A row's status: validated within every gate or not, built here but not validated, not built here, or
# neither passed nor failed because its validation is not there or no longer matches its files.
STALE, MISSING = "stale", "missing"


def latency_notes(validation: dict | None) -> list[str]:
    """The latency warnings validation recorded, per batch size: a coefficient of variation above
    `validation.latency.cv_warn_percent`, the one threshold (kiln.latency applies it). The
    summary's `flags` and the page's measurement notes both come from here."""
    return [f"batch {lat['batch_size']}: {lat['warning']}"
            for lat in (validation or {}).get("latency") or [] if lat.get("warning")]
