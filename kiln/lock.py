"""The lock file: every deterministic artifact of a run, by digest, so CI can prove it reproduces them.

``write_lock(results_dir, out)`` records, for a finished run's results folder:

* each file whose bytes are deterministic, by sha256: the datasets' annotations, every ONNX stage
  file (export, simplified, surgery, each precision variant) per model and opset, and the
  calibration image lists;
* each image folder of a generated dataset, by one sha256 over its files' names and digests;
* each ``.npz`` (preprocessed inputs, reference outputs) by ``arrays_sha256``: a digest of its arrays'
  names, dtypes, shapes and bytes, not of the zip container around them, so a NumPy that writes
  other zip metadata (timestamps, zip64 fields) does not read as a different artifact;
* each engine by what is reproducible about it: device, backend and its version, status, the
  sha256 of the ONNX it was built from, and a digest of what the builder made of it (layers.json for
  TensorRT backends, the op histogram of the optimized graph for ONNX Runtime). Never the plan
  bytes: TensorRT picks kernels by timing them, so two builds of one network differ.

Run records (``*.json`` beside the artifacts), validations and the summary are not locked: they hold
timings, latencies and absolute paths.

Each entry says how it is compared (``compare``), since not every artifact can be byte-identical on
every CPU (docs/performance.md, "Reproducibility check"):

* ``bytes``: the sha256 (or arrays_sha256 / tree_sha256) must match. Datasets, preprocessed inputs,
  calibration lists, and every ONNX whose sha256 matches.
* ``onnx``: an ONNX file whose bytes differ passes when its graph is the same (nodes, attributes, IO,
  opsets, initializer names, dtypes and shapes: ``structure_sha256``) and its tensor values are
  within tolerance: the values of each group (``weights``; ``scales``, the Q/DQ scales, which
  calibration on another CPU's kernels moves) are compared through their L2 norm and 8 seeded random
  projections, each within ``rtol`` x the group's norm.
* ``arrays``: an .npz of float outputs (the fp32 reference) whose bytes differ passes when every
  array has the same name, dtype and shape, integer arrays are equal, and float arrays are within
  ``rtol`` of their norm, compared the same way.
* ``engine``: every field equal, except the source ONNX's sha256, which follows that ONNX's verdict.

``compare(results_dir, lock)`` lists every difference between a results folder and a lock;
``check(results_dir, lock)`` also says which artifacts matched only within tolerance.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from kiln.util import read_json, sha256, write_json

FORMAT = 2

# Tolerances of the "onnx" and "arrays" comparisons, relative to a value group's L2 norm. Weights
# are folded or converted by deterministic code (one ulp of fp32 is 6e-8); Q/DQ scales come from
# calibration statistics that ONNX Runtime computes with CPU-specific kernels; reference outputs too.
RTOL = {"weights": 1e-4, "scales": 1e-2, "outputs": 1e-4}
PROJECTIONS = 8

# The tools whose versions decide the artifacts' bytes; recorded so that a difference can be explained.
# TensorRT wheels are named per CUDA version (tensorrt_rtx_cu13, tensorrt_cu12): found by prefix.
TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "onnx-graphsurgeon", "nvidia-modelopt", "numpy", "pillow",
         "polygraphy")  # named first in the report of a difference; kiln.lock records every installed package

# ONNX files of each model/opset folder that are deterministic (records beside them are not).
ONNX_STAGES = ("export", "simplified", "surgery", "fp32", "fp16", "bf16", "int8", "fp8")

NOTE = (
    "Written by `kiln lock` from a clean demo run; `make verify` reruns the demo in a temporary "
    "folder and compares. Files by sha256 of their bytes; .npz by arrays_sha256 (names, dtypes, shapes "
    "and bytes of the arrays, not the zip container); image folders by tree_sha256 (names and sha256 of "
    "their files); engines by backend, version, device, source ONNX and the digest of layers.json "
    "(TensorRT) or of the optimized graph's op histogram (ONNX Runtime), never the plan bytes. Each "
    "entry's 'compare' says how it is compared where bytes differ: 'bytes' (they must not), 'onnx' (same "
    "graph, values within rtol of their norm), 'arrays' (same arrays, floats within rtol), 'engine'."
)


def arrays_sha256(path: str | Path) -> str:
    """sha256 over an .npz's arrays, sorted by name: name, dtype, shape and raw bytes of each."""
    import numpy as np

    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        for name in sorted(z.files):
            a = np.ascontiguousarray(z[name])
            h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def tree_sha256(folder: str | Path) -> str:
    """sha256 over every file below `folder`: relative path and sha256 of each, sorted by path."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def _projections(arrays: list, rtol: float) -> dict[str, Any]:
    """L2 norm and seeded random projections of the arrays' values, in float64 (a tolerance digest)."""
    import numpy as np

    rng = np.random.default_rng(0)
    proj = np.zeros(PROJECTIONS)
    sq = 0.0
    n = 0
    for a in arrays:
        x = np.asarray(a, dtype=np.float64).ravel()
        for start in range(0, x.size, 1 << 20):  # bounded memory for large models
            chunk = x[start:start + (1 << 20)]
            # Unscaled Gaussian projections: a change dx moves each by about ||dx||, so the comparison
            # below reads as a relative L2 difference.
            proj += rng.standard_normal((PROJECTIONS, chunk.size)) @ chunk
        sq += float(x @ x)
        n += x.size
    return {"values": n, "norm": float(f"{np.sqrt(sq):.9g}"), "proj": [float(f"{p:.9g}") for p in proj], "rtol": rtol}


def _close(want: dict, have: dict) -> str | None:
    """None when two digests of _projections agree within the lock's rtol; else how far apart they are."""
    if want.get("values") != have.get("values") or len(want.get("proj", [])) != len(have.get("proj", [])):
        return f"{have.get('values')} values, the lock has {want.get('values')}"
    scale = max(abs(want["norm"]), 1e-30)
    dev = max([abs(have["norm"] - want["norm"])] + [abs(a - b) for a, b in zip(have["proj"], want["proj"])]) / scale
    return None if dev <= want["rtol"] else f"values differ by {dev:.2e} of their norm (tolerance {want['rtol']:g})"


def onnx_digest(path: str | Path) -> dict[str, Any] | None:
    """Graph digest and value digests of an ONNX file (None: not an ONNX file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception:  # onnx raises DecodeError and others for a file that is not an ONNX model
        return None
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
              and len(n.input) > 1}
    groups: dict[str, list] = {"weights": [], "scales": []}

    def strip(t) -> None:
        a = numpy_helper.to_array(t)
        if a.dtype.kind in "fiub" or a.dtype.name.startswith(("float8", "bfloat")):
            groups["scales" if t.name in scales else "weights"].append(a.astype(np.float64))
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)

    def walk(graph) -> None:
        for t in graph.initializer:
            strip(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    attr.t.name = attr.t.name or f"{node.name}.{attr.name}"
                    strip(attr.t)
                for t in attr.tensors:
                    strip(t)
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return {"structure_sha256": hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest(),
            **{g: _projections(v, RTOL[g]) for g, v in groups.items()}}


def arrays_digest(path: str | Path) -> dict[str, Any]:
    """Per array of an .npz: dtype and shape; integer arrays by sha256, float arrays by _projections."""
    import numpy as np

    out = {}
    with np.load(path, allow_pickle=False) as z:
        for name in sorted(z.files):
            a = z[name]
            entry: dict[str, Any] = {"dtype": a.dtype.str, "shape": list(a.shape)}
            if a.dtype.kind == "f":
                entry.update(_projections([a], RTOL["outputs"]))
            else:
                entry["sha256"] = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            out[name] = entry
    return out


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _engine_entry(record_path: Path, onnx_by_sha: dict[str, str]) -> dict[str, Any]:
    rec = read_json(record_path)
    entry: dict[str, Any] = {
        "kind": "engine",
        "compare": "engine",
        # The lock's key of the ONNX it was built from: where that ONNX matches only within tolerance,
        # so may this sha256.
        "onnx": onnx_by_sha.get(rec.get("onnx_sha256")),
        "device": rec.get("device"),
        "backend": rec.get("backend"),
        "backend_version": rec.get("backend_version"),
        "status": rec.get("status"),
        "onnx_sha256": rec.get("onnx_sha256"),
    }
    layers = record_path.parent / "layers.json"
    if layers.is_file():
        doc = read_json(layers)
        entry["layers_source"] = doc.get("source")
        entry["num_layers"] = doc.get("num_layers")
        entry["layers_sha256"] = sha256(layers)
    if "ops_out" in rec:  # ONNX Runtime: the optimized graph's op histogram
        entry["ops_sha256"] = _json_sha256(rec["ops_out"])
    return entry


def collect(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every lockable artifact under `results_dir`: relative path -> its entry, sorted by path."""
    results = Path(results_dir)
    found: dict[str, dict[str, Any]] = {}

    def rel(p: Path) -> str:
        return p.relative_to(results).as_posix()

    for ann in results.glob("data/*/*/annotations.json"):
        found[rel(ann)] = {"kind": "file", "compare": "bytes", "sha256": sha256(ann)}
        images = ann.parent / "images"
        if images.is_dir():
            found[rel(images) + "/"] = {"kind": "tree", "compare": "bytes",
                                        "files": sum(1 for q in images.rglob("*") if q.is_file()),
                                        "tree_sha256": tree_sha256(images)}
    for npz in results.glob("inputs/*/*.npz"):  # uint8 pixels from deterministic integer resizing
        found[rel(npz)] = {"kind": "npz", "compare": "bytes", "arrays_sha256": arrays_sha256(npz)}
    for npz in results.glob("reference/*/opset*/outputs.npz"):  # float outputs of ONNX Runtime's CPU kernels
        found[rel(npz)] = {"kind": "npz", "compare": "arrays", "arrays_sha256": arrays_sha256(npz),
                           "arrays": arrays_digest(npz)}
    onnx_by_sha: dict[str, str] = {}
    for folder in results.glob("onnx/*/opset*"):
        for stage in ONNX_STAGES:
            f = folder / f"{stage}.onnx"
            if f.is_file():
                digest = onnx_digest(f)
                entry = {"kind": "file", "compare": "bytes" if digest is None else "onnx", "sha256": sha256(f)}
                found[rel(f)] = {**entry, **(digest or {})}
                onnx_by_sha.setdefault(entry["sha256"], rel(f))
        for calib in folder.glob("*.calib.txt"):
            found[rel(calib)] = {"kind": "file", "compare": "bytes", "sha256": sha256(calib)}
    for record in results.glob("engines/*/*/*/engine.json"):
        found[rel(record.parent) + "/"] = _engine_entry(record, onnx_by_sha)
    return dict(sorted(found.items()))


def environment() -> dict[str, Any]:
    """Python, machine, CPU and every installed package's version (as in requirements.lock)."""
    from kiln import envlock

    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu(),
            "packages": envlock.installed()}


def _cpu() -> str | None:
    """The CPU model: ONNX Runtime picks kernels by instruction set, so float outputs can differ across CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def make_lock(results_dir: str | Path) -> dict[str, Any]:
    artifacts = collect(results_dir)
    if not artifacts:
        raise FileNotFoundError(f"{results_dir}: no artifacts to lock (is it a Kiln results folder of a finished run?)")
    return {"kiln_lock": FORMAT, "note": NOTE, "environment": environment(), "artifacts": artifacts}


def write_lock(results_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the lock of `results_dir` to `out` (JSON, stable key order) and return it."""
    lock = make_lock(results_dir)
    write_json(out, lock)
    return lock


def read_lock(lock: str | Path | dict) -> dict[str, Any]:
    data = lock if isinstance(lock, dict) else read_json(lock)
    if not isinstance(data, dict) or data.get("kiln_lock") != FORMAT or not isinstance(data.get("artifacts"), dict):
        raise ValueError(f"{lock}: not a Kiln lock file of format {FORMAT}; regenerate it with `make lock`")
    return data


def check(results_dir: str | Path, lock: str | Path | dict) -> tuple[list[str], list[str]]:
    """(differences, artifacts that matched only within tolerance), one line each."""
    want = read_lock(lock)["artifacts"]
    have = collect(results_dir)
    diffs: list[str] = []
    tolerated: list[str] = []
    verdict: dict[str, str] = {}  # ONNX key -> "bytes" | "tolerance" | "differs", for the engines that follow it
    order = sorted(set(want) | set(have), key=lambda p: (want.get(p, have.get(p, {})).get("kind") == "engine", p))
    for path in order:
        if path not in have:
            diffs.append(f"{path}: missing (the lock has it)")
            continue
        if path not in want:
            diffs.append(f"{path}: not in the lock")
            continue
        a, b = want[path], have[path]
        kind = a.get("compare", "bytes")
        if kind == "onnx" and a.get("sha256") != b.get("sha256"):
            why = _onnx_differs(a, b)
            verdict[path] = "differs" if why else "tolerance"
            if why:
                diffs.append(f"{path}: {why}")
            else:
                tolerated.append(f"{path}: same graph, values within tolerance (bytes differ)")
            continue
        if kind == "arrays" and a.get("arrays_sha256") != b.get("arrays_sha256"):
            why = _arrays_differ(a.get("arrays", {}), b.get("arrays", {}))
            if why:
                diffs.append(f"{path}: {why}")
            else:
                tolerated.append(f"{path}: same arrays, float values within tolerance (bytes differ)")
            continue
        verdict.setdefault(path, "bytes")
        follows = verdict.get(a.get("onnx") or "") == "tolerance" and a.get("onnx") == b.get("onnx")
        for key in sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                continue
            if key == "onnx_sha256" and follows:
                tolerated.append(f"{path}: built from {a['onnx']}, which matches within tolerance")
                continue
            diffs.append(f"{path}: {key} is {b.get(key)!r}, the lock has {a.get(key)!r}")
    return diffs, tolerated


def _onnx_differs(want: dict, have: dict) -> str | None:
    if want.get("structure_sha256") != have.get("structure_sha256"):
        return "the graph differs (nodes, attributes, IO or initializer names, dtypes, shapes)"
    for group in ("weights", "scales"):
        why = _close(want[group], have.get(group, {}))
        if why:
            return f"{group}: {why}"
    return None


def _arrays_differ(want: dict, have: dict) -> str | None:
    if sorted(want) != sorted(have):
        return f"arrays {sorted(have)}, the lock has {sorted(want)}"
    for name, a in want.items():
        b = have[name]
        if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
            return f"array '{name}' is {b['dtype']} {b['shape']}, the lock has {a['dtype']} {a['shape']}"
        why = (None if a.get("sha256") == b.get("sha256") else "integer values differ") if "sha256" in a \
            else _close(a, b)
        if why:
            return f"array '{name}': {why}"
    return None


def compare(results_dir: str | Path, lock: str | Path | dict) -> list[str]:
    """Every difference between the artifacts under `results_dir` and `lock`, one line each (empty: same)."""
    return check(results_dir, lock)[0]


def environment_changes(lock: str | Path | dict) -> list[str]:
    """What differs between this host and the host that wrote the lock: CPU, Python, package versions."""
    then = read_lock(lock).get("environment") or {}
    now = environment()
    lines = [f"{k}: {now.get(k)} here, {then.get(k)} in the lock" for k in ("python", "machine", "cpu")
             if then.get(k) != now.get(k)]
    a, b = then.get("packages") or {}, now["packages"]
    for name in sorted(set(a) | set(b), key=lambda n: (n not in TOOLS, n)):
        if a.get(name) != b.get(name):
            lines.append(f"{name}: {b.get(name) or 'not installed'} here, {a.get(name) or 'not installed'} in the lock")
    return lines


# --------------------------------------------------------------------------- `kiln lock` and `kiln verify`


def add_commands(sub) -> None:
    """The `lock` and `verify` subcommands, on the `kiln` command line's subparsers."""
    lock = sub.add_parser("lock", help="write the lock file of a finished run's deterministic artifacts")
    lock.add_argument("--results", default="results", help="results folder of a finished run (default: results)")
    lock.add_argument("--out", default="kiln.lock", help="lock file to write (default: kiln.lock)")
    verify = sub.add_parser("verify", help="compare a finished run's artifacts with the lock file; exit 1 on any difference")
    verify.add_argument("--results", default="results", help="results folder of a finished run (default: results)")
    verify.add_argument("--lock", default="kiln.lock", help="lock file (default: kiln.lock)")


def run_command(args) -> int:
    """Run `kiln lock` or `kiln verify`; returns the exit status."""
    import sys

    try:
        if args.command == "lock":
            lock = write_lock(args.results, args.out)
            print(f"{args.out}: {len(lock['artifacts'])} artifacts of {args.results}")
            return 0
        report = environment_report(args.lock)
        diffs, tolerated = check(args.results, args.lock)
        n = len(read_lock(args.lock)["artifacts"])
    except (OSError, ValueError) as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    for line in report:
        print(line)
    for line in tolerated:
        print(f"within tolerance: {line}")
    exact = n - len(diffs) - len({t.split(':')[0] for t in tolerated})
    if not diffs:
        print(f"{args.results}: all {n} artifacts of {args.lock} reproduced ({exact} byte-identical, "
              f"{n - exact} within tolerance)")
        return 0
    for d in diffs:
        print(f"DIFF {d}")
    print(f"{args.results}: {len(diffs)} difference(s) from {args.lock}", file=sys.stderr)
    return 1


def environment_report(lock: str | Path) -> list[str]:
    """The first lines of `kiln verify`: installed packages against requirements.lock and against the lock's host."""
    from kiln import envlock

    lines = []
    req = Path(lock).resolve().parent / envlock.LOCK_FILE
    if req.is_file():
        diffs = envlock.differences(req)
        lines.append(f"environment: {len(diffs)} installed package(s) differ from {req.name}" +
                     (":" if diffs else f" (all {len(envlock.read(req))} pinned packages installed as locked)"))
        lines += [f"  {d}" for d in diffs]
    changes = environment_changes(lock)
    lines.append(f"environment: {'this host differs from' if changes else 'same as'} the host that wrote "
                 f"{Path(lock).name}" + (":" if changes else ""))
    lines += [f"  {c}" for c in changes]
    return lines
