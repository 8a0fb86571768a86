"""`kiln compare OLD NEW`: two runs' summaries side by side, regressions flagged against tolerances.

Rows are matched on model x device x precision. A row regresses when its status becomes "failed", its
mAP50-95 drops by more than an absolute tolerance, its p50 latency grows or its throughput falls by more
than a relative one (both measured at the same batch size). Rows only one run has are listed, not flagged; a
mixed variant (int8-mixed) that keeps other nodes than before is noted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kiln import paths
from kiln.errors import KilnError
from kiln.util import read_json

Key = tuple[str, str, str]  # model, device, precision


@dataclass(frozen=True)
class Tolerances:
    map_drop: float = 0.01  # absolute mAP50-95
    latency_increase: float = 10.0  # percent of the old p50
    throughput_drop: float = 10.0  # percent of the old images/s


@dataclass
class Change:
    key: Key
    old: dict | None
    new: dict | None
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "added" if self.old is None else "removed" if self.new is None else "common"


def load_rows(path: str | Path) -> dict[Key, dict]:
    """Summary rows by key, from a summary.json or a results folder holding report/summary.json."""
    p = Path(path)
    if p.is_dir():
        p = Path(paths.fmt(paths.SUMMARY_JSON, results=p))
    if not p.is_file():
        raise KilnError(f"{path}: no summary there: give a summary.json or a results folder with report/summary.json")
    try:
        rows = read_json(p)["rows"]
        return {(r["model"], r["device"], r["precision"]): r for r in rows}
    except (ValueError, KeyError, TypeError) as err:
        raise KilnError(f"{p} is not a Kiln summary.json ({type(err).__name__}: {err})") from None


def _pct(old: float, new: float) -> float | None:
    return None if not old else 100.0 * (new - old) / old


def _both(old: dict, new: dict, key: str) -> bool:
    return old.get(key) is not None and new.get(key) is not None


def _kept(row: dict) -> str | None:
    """A mixed row's kept nodes, without the why (summary column `kept`: "2 kept in higher precision: a, b (why)")."""
    kept = row.get("kept")
    return kept.split(" (", 1)[0] if kept else None


def compare_rows(old: dict, new: dict, tol: Tolerances) -> tuple[list[str], list[str]]:
    """(regressions, notes) of one row present in both runs."""
    reg, notes = [], []
    if old["status"] != new["status"]:
        change = f"status {old['status']} -> {new['status']}"
        (reg if new["status"] == "failed" else notes).append(change + (f" ({new['reason']})" if new.get("reason") else ""))
    if _both(old, new, "map50_95"):
        drop = old["map50_95"] - new["map50_95"]
        if drop > tol.map_drop:
            reg.append(f"mAP50-95 dropped {drop:.4f} (> {tol.map_drop})")
    kept_old, kept_new = _kept(old), _kept(new)
    if kept_old != kept_new and (kept_old or kept_new):  # a mixed variant (int8-mixed) that keeps other nodes now
        notes.append(f"kept nodes changed: {kept_old or '-'} -> {kept_new or '-'}")
    timed = _both(old, new, "latency_median_ms") or _both(old, new, "throughput_ips")
    if timed and old.get("batch_size") != new.get("batch_size"):
        notes.append(f"batch size {old.get('batch_size')} -> {new.get('batch_size')}: latency not compared")
        return reg, notes
    if _both(old, new, "latency_median_ms"):
        pct = _pct(old["latency_median_ms"], new["latency_median_ms"])
        if pct is not None and pct > tol.latency_increase:
            reg.append(f"p50 latency +{pct:.1f}% (> {tol.latency_increase:g}%)")
    if _both(old, new, "throughput_ips"):
        pct = _pct(old["throughput_ips"], new["throughput_ips"])
        if pct is not None and -pct > tol.throughput_drop:
            reg.append(f"throughput {pct:.1f}% (> {tol.throughput_drop:g}% drop)")
    return reg, notes


def compare(old: dict[Key, dict], new: dict[Key, dict], tol: Tolerances = Tolerances()) -> list[Change]:
    """Every row of either run, in the new run's order then the removed ones, with what changed."""
    changes = []
    for key, n in new.items():
        o = old.get(key)
        c = Change(key, o, n)
        if o is None:
            c.notes.append(f"added ({n['status']})")
        else:
            c.regressions, c.notes = compare_rows(o, n, tol)
        changes.append(c)
    changes += [Change(key, o, None, notes=[f"removed (was {o['status']})"]) for key, o in old.items() if key not in new]
    return changes


# --------------------------------------------------------------------------- output


def _pair(old: dict | None, new: dict | None, key: str, fmt: str, rel: bool) -> str:
    a = None if old is None else old.get(key)
    b = None if new is None else new.get(key)
    if a is None and b is None:
        return ""
    text = f"{'-' if a is None else format(a, fmt)} -> {'-' if b is None else format(b, fmt)}"
    if a is not None and b is not None:
        if rel:
            pct = _pct(a, b)
            text += "" if pct is None else f" ({pct:+.1f}%)"
        else:
            text += f" ({b - a:+.4f})"
    return text


HEADERS = ["model", "device", "precision", "status", "mAP50-95", "p50 ms", "images/s", "verdict"]


def table_rows(changes: list[Change]) -> list[list[str]]:
    out = []
    for c in changes:
        o, n = c.old, c.new
        so, sn = (o or {}).get("status", "-"), (n or {}).get("status", "-")
        verdict = "REGRESSION: " + "; ".join(c.regressions) if c.regressions else "; ".join(c.notes) or "ok"
        if c.regressions and c.notes:
            verdict += "; " + "; ".join(c.notes)
        out.append([*c.key, so if so == sn else f"{so} -> {sn}", _pair(o, n, "map50_95", ".4f", False),
                    _pair(o, n, "latency_median_ms", ".2f", True), _pair(o, n, "throughput_ips", ".1f", True),
                    verdict])
    return out


def format_text(changes: list[Change]) -> str:
    rows = [HEADERS] + table_rows(changes)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(HEADERS[-1]))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(changes: list[Change]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table_rows(changes)]
    return "\n".join(lines)


def verdict_line(changes: list[Change], tol: Tolerances) -> str:
    n_reg = sum(bool(c.regressions) for c in changes)
    added = sum(c.kind == "added" for c in changes)
    removed = sum(c.kind == "removed" for c in changes)
    return (f"{n_reg} regression{'s' if n_reg != 1 else ''} in {len(changes)} rows ({added} added, {removed} removed); "
            f"tolerances: mAP50-95 drop {tol.map_drop:g}, p50 latency +{tol.latency_increase:g}%, "
            f"throughput -{tol.throughput_drop:g}%")


# --------------------------------------------------------------------------- command line


def add_command(sub) -> None:
    """Register `kiln compare` on the CLI's subparsers."""
    d = Tolerances()
    p = sub.add_parser("compare", help="compare two runs' summaries; exit 1 on a regression",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the baseline: summary.json, or a results folder")
    p.add_argument("new", help="the run to check: summary.json, or a results folder")
    p.add_argument("--map-drop", type=float, default=d.map_drop, metavar="ABS",
                   help=f"largest allowed mAP50-95 drop, absolute (default {d.map_drop})")
    p.add_argument("--latency-increase", type=float, default=d.latency_increase, metavar="PCT",
                   help=f"largest allowed p50 latency increase, percent (default {d.latency_increase:g})")
    p.add_argument("--throughput-drop", type=float, default=d.throughput_drop, metavar="PCT",
                   help=f"largest allowed throughput drop, percent (default {d.throughput_drop:g})")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (e.g. for a CI job summary)")


def run_command(args: argparse.Namespace) -> int:
    """0: no regression; 1: at least one; 2: a summary could not be read."""
    tol = Tolerances(args.map_drop, args.latency_increase, args.throughput_drop)
    if min(tol.map_drop, tol.latency_increase, tol.throughput_drop) < 0:
        print("kiln: compare: tolerances cannot be negative (--map-drop, --latency-increase, --throughput-drop)",
              file=sys.stderr)
        return 2
    try:
        changes = compare(load_rows(args.old), load_rows(args.new), tol)
    except KilnError as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    print(format_markdown(changes) if args.markdown else format_text(changes))
    print()
    print(verdict_line(changes, tol))
    return 1 if any(c.regressions for c in changes) else 0
