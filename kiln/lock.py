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

``compare(results_dir, lock)`` lists every difference between a results folder and a lock.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.util import read_json, sha256, write_json

FORMAT = 1

# The tools whose versions decide the artifacts' bytes; recorded so that a difference can be explained.
# TensorRT wheels are named per CUDA version (tensorrt_rtx_cu13, tensorrt_cu12): found by prefix.
TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "onnx-graphsurgeon", "nvidia-modelopt", "numpy", "pillow",
         "polygraphy")

# ONNX files of each model/opset folder that are deterministic (records beside them are not).
ONNX_STAGES = ("export", "simplified", "surgery", "fp32", "fp16", "bf16", "int8", "fp8")

NOTE = (
    "Written by `kiln lock` from a clean demo run; `make verify` reruns the demo in a temporary "
    "folder and compares. Files by sha256 of their bytes; .npz by arrays_sha256 (names, dtypes, shapes "
    "and bytes of the arrays, not the zip container); image folders by tree_sha256 (names and sha256 of "
    "their files); engines by backend, version, device, source ONNX and the digest of layers.json "
    "(TensorRT) or of the optimized graph's op histogram (ONNX Runtime), never the plan bytes."
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


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _engine_entry(record_path: Path) -> dict[str, Any]:
    rec = read_json(record_path)
    entry: dict[str, Any] = {
        "kind": "engine",
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
        found[rel(ann)] = {"kind": "file", "sha256": sha256(ann)}
        images = ann.parent / "images"
        if images.is_dir():
            found[rel(images) + "/"] = {"kind": "tree", "files": sum(1 for q in images.rglob("*") if q.is_file()),
                                        "tree_sha256": tree_sha256(images)}
    for npz in [*results.glob("inputs/*/*.npz"), *results.glob("reference/*/opset*/outputs.npz")]:
        found[rel(npz)] = {"kind": "npz", "arrays_sha256": arrays_sha256(npz)}
    for folder in results.glob("onnx/*/opset*"):
        for stage in ONNX_STAGES:
            f = folder / f"{stage}.onnx"
            if f.is_file():
                found[rel(f)] = {"kind": "file", "sha256": sha256(f)}
        for calib in folder.glob("*.calib.txt"):
            found[rel(calib)] = {"kind": "file", "sha256": sha256(calib)}
    for record in results.glob("engines/*/*/*/engine.json"):
        found[rel(record.parent) + "/"] = _engine_entry(record)
    return dict(sorted(found.items()))


def environment() -> dict[str, str | None]:
    """Versions of Python and of the tools that make the artifacts (None: not installed)."""
    env: dict[str, str | None] = {"python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu()}
    for name in TOOLS:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if name.startswith("tensorrt") and not name.endswith(("_libs", "_bindings")):
            env[name] = dist.version
    return dict(sorted(env.items()))


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


def compare(results_dir: str | Path, lock: str | Path | dict) -> list[str]:
    """Every difference between the artifacts under `results_dir` and `lock`, one line each (empty: same)."""
    want = read_lock(lock)["artifacts"]
    have = collect(results_dir)
    diffs = []
    for path in sorted(set(want) | set(have)):
        if path not in have:
            diffs.append(f"{path}: missing (the lock has it)")
        elif path not in want:
            diffs.append(f"{path}: not in the lock")
        else:
            a, b = want[path], have[path]
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    diffs.append(f"{path}: {key} is {b.get(key)!r}, the lock has {a.get(key)!r}")
    return diffs


def environment_changes(lock: str | Path | dict) -> list[str]:
    """Tool versions that differ between this host and the host that wrote the lock (explains differences)."""
    then = read_lock(lock).get("environment") or {}
    now = environment()
    return [f"{k}: {now.get(k)} here, {then.get(k)} in the lock" for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)]



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
        diffs = compare(args.results, args.lock)
        n = len(read_lock(args.lock)["artifacts"])
    except (OSError, ValueError) as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    if not diffs:
        print(f"{args.results}: all {n} artifacts of {args.lock} reproduced")
        return 0
    for d in diffs:
        print(f"DIFF {d}")
    for note in environment_changes(args.lock):
        print(f"note: tool version differs: {note}")
    print(f"{args.results}: {len(diffs)} difference(s) from {args.lock}", file=sys.stderr)
    return 1
