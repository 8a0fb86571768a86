"""What the page shows, read back from a run: summary rows with the engine and validation records they stand for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kiln import findings, paths
from kiln.errors import KilnError
from kiln.util import read_json


@dataclass
class Engine:
    """One summary row (model x device x precision) and the records behind it, where they exist."""

    row: dict
    record: dict | None = None  # engine.json
    validation: dict | None = None  # validation.json
    logs: list[tuple[str, Path]] = field(default_factory=list)  # (rule, log file) of the jobs that made it
    pictures: list[Path] = field(default_factory=list)  # validation's detection pictures that are here

    @property
    def device(self) -> str:
        return self.row["device"]

    @property
    def precision(self) -> str:
        return self.row["precision"]

    @property
    def status(self) -> str:
        return self.row["status"]

    @property
    def latency(self) -> list[dict]:
        """Latency stats per batch size, as validation measured them (empty if it did not)."""
        return (self.validation or {}).get("latency") or []

    @property
    def streams(self) -> dict:
        """Throughput at N concurrent streams, as validation measured it (empty if it did not)."""
        rec = (self.validation or {}).get("streams") or {}
        return rec if rec.get("results") else {}


@dataclass
class Model:
    name: str
    engines: list[Engine] = field(default_factory=list)
    logs: list[tuple[str, Path]] = field(default_factory=list)  # export, simplify, ... of this model

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(e.device for e in self.engines))

    @property
    def precisions(self) -> list[str]:
        return list(dict.fromkeys(e.precision for e in self.engines))


@dataclass
class Run:
    summary: Path
    columns: list[str]
    models: list[Model]
    deploy: list[dict] = field(default_factory=list)  # kiln.findings.deploy: per model x device

    def count(self, status: str) -> int:
        return sum(e.status == status for m in self.models for e in m.engines)

    @property
    def total(self) -> int:
        return sum(len(m.engines) for m in self.models)


def _log(results: str, rule: str, name: str) -> tuple[str, Path] | None:
    p = Path(paths.fmt(paths.LOG, results=results, rule=rule, name=name))
    return (rule, p) if p.is_file() else None


def load(results: str | Path, summary_json: str | Path | None = None, inputs: list[str] | None = None) -> Run:
    """Read summary.json and, per row, the engine and validation records, pictures and logs that exist.

    `inputs` are the rule's input files: under a storage provider, the local copies of the records.
    """
    results = str(results)
    local = paths.local_copies(inputs or [])
    summary_json = Path(summary_json or local(paths.fmt(paths.SUMMARY_JSON, results=results)))
    if not summary_json.is_file():
        raise KilnError(f"{summary_json} does not exist: run the workflow (its `summary` rule) first")
    summary = read_json(summary_json)
    rows = summary.get("rows")
    if not isinstance(rows, list):
        raise KilnError(f"{summary_json} is not a Kiln summary (no 'rows' list)")
    models: dict[str, Model] = {}
    for row in rows:
        dev, model, prec = row["device"], row["model"], row["precision"]
        key = {"results": results, "device": dev, "model": model, "precision": prec}
        e = Engine(row=row)
        rec, val = Path(local(paths.fmt(paths.ENGINE_RECORD, **key))), Path(local(paths.fmt(paths.VALIDATION, **key)))
        e.record = read_json(rec) if rec.is_file() else None
        # A stale row's validation is of other files than those there now: none of its numbers are shown.
        e.validation = read_json(val) if val.is_file() and row["status"] not in (findings.STALE, findings.MISSING) else None
        e.pictures = _pictures(e.validation, val.parent)
        names = [("build", f"{dev}_{model}_{prec}"), ("validate", f"{dev}_{model}_{prec}"),
                 ("baseline", f"{dev}_{model}")]  # the PyTorch timing this engine's speed-up is against
        e.logs = [x for x in (_log(results, r, n) for r, n in names) if x]
        models.setdefault(model, Model(model)).engines.append(e)
    for m in models.values():
        m.logs = _model_logs(results, m)
    columns = summary.get("columns") or (list(rows[0]) if rows else [])
    # Summaries written before the deploy table existed get it computed from their rows (kiln compare reads old runs).
    deploy = summary.get("deploy") or findings.deploy(rows)
    return Run(summary_json, columns, list(models.values()), deploy)


def _pictures(validation: dict | None, folder: Path) -> list[Path]:
    """The pictures validation.json lists (paths.PICTURE), where they are: as recorded, or beside the record."""
    found = []
    for p in (validation or {}).get("pictures") or []:
        for candidate in (Path(p), folder / Path(p).name):
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def _model_logs(results: str, model: Model) -> list[tuple[str, Path]]:
    """Logs of the model's ONNX stages at the opsets and variants its engines were built from."""
    found: dict[Path, tuple[str, Path]] = {}
    for e in model.engines:
        if not e.record:
            continue
        opset = e.record.get("opset")
        stem = Path(e.record.get("onnx", "")).stem  # the precision variant the engine was built from
        names = [(r, f"{model.name}_opset{opset}") for r in ("export", "simplify", "surgery", "reference")]
        names += [(r, f"{model.name}_opset{opset}_{stem}") for r in ("precision", "quantize")]
        for rule, name in names:
            hit = _log(results, rule, name)
            if hit:  # labelled by what tells them apart: "export opset17", "quantize opset17_int8"
                found.setdefault(hit[1], (f"{rule} {name.removeprefix(model.name + '_')}", hit[1]))
    return list(found.values())
