"""Stage `diagnose`: when a device's parser or builder refuses a model, find the smallest failing subgraph.

For a failed build (``engine.json`` status ``failed``), Kiln:

1. checks the ONNX the engine was built from again, with the device's own backend (``build()``,
   the exact code of the ``build`` rule) in a child process, and notes whether the parser or the
   builder refuses it;
2. freezes the input shapes (batch 1) and folds constants (``polygraphy surgeon sanitize``), then
   takes ONNX Runtime's outputs of every tensor as golden values (``polygraphy run --onnxrt
   --onnx-outputs mark all``, merged with the inputs by ``polygraphy data merge``) so that each
   subgraph's new inputs get real values;
3. reduces the model with ``polygraphy debug reduce`` (``--mode bisect``, then ``--mode linear`` on
   its result), each candidate checked by ``python -m kiln.diagnose check`` (the same parse, or
   parse and build, in a fresh process: exit 1 when it fails the same way);
4. writes ``diagnosis.json``: the reduced subgraph's nodes (names, op types), the parser's or
   builder's message on it, and a hint from Kiln's op table (:mod:`kiln.trt_ops`), e.g.
   "LayerNormalization at /encoder/ln_3 is not supported by TensorRT 8.5 ...: export at opset 16
   or enable decompose_layernorm". ``reduced.onnx`` lies beside it.

A build that succeeded gives ``{"status": "not needed"}`` at once. The summary's ``diagnosis``
column carries the hint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.util import atomic_path, read_json, scratch_dir, write_json

log = logging.getLogger(__name__)

FLAVORS = ("tensorrt", "tensorrt-rtx")
# Exit codes of `python -m kiln.diagnose check`: 0 builds, 1 fails at the stage asked, 2 anything else.
PASS, FAIL, OTHER = 0, 1, 2
CHECK_TIMEOUT_S = 600


def targets(cfg, can_build: dict[str, str | None]) -> list[str]:
    """One diagnosis per job of a TensorRT or TensorRT-RTX device that this run builds (summary inputs)."""
    from kiln import paths

    return [paths.fmt(paths.DIAGNOSIS, results=cfg.results, device=d, model=m, precision=p)
            for d, m, p in cfg.jobs() if can_build.get(d) is None and cfg.devices[d].backend in FLAVORS]


def params(cfg, device: str, model: str, precision: str) -> dict:
    from kiln import build

    return {"build": build.params(cfg, device), "precision": precision, "model": model}


# --------------------------------------------------------------------------------------------------
# The check one candidate gets (in its own process: one TensorRT flavor per process)


def device_json(device) -> str:
    return json.dumps(dataclasses.asdict(device))


def device_from_json(text: str):
    from kiln.config import DeviceProfile

    data = json.loads(text)
    for f in dataclasses.fields(DeviceProfile):
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return DeviceProfile(**data)


def check(onnx_path: Path, device, precision: str, stage: str) -> tuple[int, str, str]:
    """(exit code, stage reached, message): does this device's backend parse (and build) the ONNX?"""
    from kiln import backends
    from kiln.backends import trt_common as common

    backend = backends.get(device.backend)
    flavor = device.backend
    try:
        ns = common.polygraphy_trt(flavor)
        strongly = flavor == "tensorrt-rtx" or backend.source_precision(precision, device) != "fp32" or \
            (common.major_minor(ns.trt.__version__) or (0, 0)) >= (11, 0)
        with common.polygraphy_logs():
            common.parse_onnx(ns, onnx_path, strongly)
    except KilnError as err:
        return FAIL, "parse", str(err)
    except Exception as err:
        return OTHER, "parse", f"{type(err).__name__}: {err}"
    if stage == "parse":
        return PASS, "parse", ""
    with tempfile.TemporaryDirectory(prefix="build-", dir=".") as tmp:  # cwd: diagnose()'s scratch folder
        try:
            if precision == "int8" and device.int8_mode == "calibrator":
                precision = "fp32"  # a subgraph has no calibration data: the failure is in the network
            backend.build(Path(onnx_path), Path(tmp) / "model.engine", device, precision, validation_batch_size=1)
        except KilnError as err:
            return FAIL, "build", str(err)
        except Exception as err:
            return OTHER, "build", f"{type(err).__name__}: {err}"
    return PASS, "build", ""


def _check_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.diagnose check")
    ap.add_argument("onnx")
    ap.add_argument("--device-json", required=True, help="file holding the DeviceProfile as JSON")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--stage", choices=["parse", "build"], default="build")
    ap.add_argument("--match", default="", help="regular expression the failure message must match")
    ap.add_argument("--report", help="write {code, stage, message} here as JSON")
    ap.add_argument("--exact", action="store_true", help="a failure at another stage than --stage is not a failure")
    a = ap.parse_args(argv)
    device = device_from_json(Path(a.device_json).read_text())
    code, stage, message = check(Path(a.onnx), device, a.precision, a.stage)
    if code == FAIL and a.exact and stage != a.stage:
        code = OTHER  # looking for a builder failure: a subgraph the parser refuses fails differently
    if code == FAIL and a.match and not re.search(a.match, message):
        code = OTHER  # a different failure than the one being reduced
    if a.report:
        Path(a.report).write_text(json.dumps({"code": code, "stage": stage, "message": message}))
    print(f"kiln diagnose check: {['pass', 'fail', 'other'][code]} at {stage}: {message[:2000]}")
    return code


# --------------------------------------------------------------------------------------------------
# The reduction


def _run(cmd: list[str], cwd: Path, what: str, env: dict | None = None, timeout: float = CHECK_TIMEOUT_S * 4) -> str:
    log.info("diagnose: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise KilnError(f"diagnose: {what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout + proc.stderr


def _polygraphy() -> list[str]:
    exe = shutil.which("polygraphy", path=os.path.dirname(sys.executable)) or shutil.which("polygraphy")
    return [exe] if exe else [sys.executable, "-m", "polygraphy"]


def _static_shapes(onnx_path: Path, spec=None) -> list[str]:
    """--override-input-shapes arguments: every dynamic axis at its smallest useful value (batch 1)."""
    from kiln.backends.trt_common import onnx_inputs

    out = []
    for name, dims in onnx_inputs(onnx_path).items():
        shape = []
        for axis, d in enumerate(dims):
            if d is not None:
                shape.append(d)
            elif axis == 0:
                shape.append(1)
            elif name == "orig_target_sizes":
                shape.append(2)
            elif spec is not None and len(dims) == 4 and axis in (2, 3):
                shape.append(int(spec.input_size[axis - 2]))
            else:
                raise KilnError(f"diagnose: input '{name}' axis {axis} is dynamic and Kiln cannot size it")
        out.append(f"{name}:[{','.join(map(str, shape))}]")
    return out


def _nodes(onnx_path: Path) -> list[dict]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [{"name": n.name, "op": (f"{n.domain}:" if n.domain not in ("", "ai.onnx") else "") + n.op_type}
            for n in model.graph.node]


def _same_failure(message: str, nodes: list[dict], stage: str) -> str:
    """A regular expression a subgraph's failure must match to count as the same failure."""
    ops = [op for _, op in re.findall(r"node \d+ '([^']*)' \(op ([^)]*)\)", message)]
    if ops:
        return "|".join(re.escape(f"(op {op})") for op in dict.fromkeys(ops))
    names = [n["name"] for n in nodes if n["name"] and n["name"] in message]
    return "|".join(re.escape(n) for n in dict.fromkeys(names)) if stage == "build" else ""


def _failing_nodes(message: str, nodes: list[dict]) -> list[dict]:
    """Nodes the parser's message names (node N 'name' (op X)); else every node of the reduced graph."""
    named = re.findall(r"node \d+ '([^']*)' \(op ([^)]*)\)", message)
    if named:
        found = [{"name": n, "op": op} for n, op in dict.fromkeys(named)]
        return found
    # A builder message names a layer: keep the nodes whose names appear in it.
    hit = [n for n in nodes if n["name"] and n["name"] in message]
    return hit or nodes


def _hint(flavor: str, version: str, failing: list[dict], stage: str, message: str, opset: int | None) -> str:
    from kiln import trt_ops

    hints = [trt_ops.hint(flavor, version, n["op"].split(":")[-1], n["name"], opset)
             for n in failing if n["op"].split(":")[-1] in trt_ops.RULES_BY_OP]
    if hints:
        return "; ".join(dict.fromkeys(hints))
    who = trt_ops.label(flavor, version)
    where = ", ".join(f"{n['op']} at {n['name'] or '(unnamed)'}" for n in failing[:5])
    reason = re.sub(r"\s+", " ", message.split(": ", 2)[-1])[:300]
    return (f"{where} {'is rejected by' if stage == 'parse' else 'cannot be built by'} {who} ({reason}): replace "
            f"it with a surgery pass or in the model, or build this model for another device")


def diagnose(onnx_path: Path, device, precision: str, out: Path, spec=None, work: Path | None = None) -> dict:
    """Reduce a model the device's backend refuses to its smallest failing subgraph; write ``out`` (JSON)."""
    from kiln import backends

    onnx_path, out = Path(onnx_path).resolve(), Path(out).resolve()
    if device.backend not in FLAVORS:
        raise KilnError(f"diagnose: device '{device.name}' has backend {device.backend}; Kiln diagnoses TensorRT "
                        f"and TensorRT-RTX parser and builder failures")
    version = backends.get(device.backend).version()
    if version is None:
        raise KilnError(f"diagnose: {device.backend} is not installed on this host")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # Polygraphy's intermediates: in a scratch folder beside `out` (removed after, or by the next run if
        # this one is killed), or in `work` when given (kept, for a look at them).
        work = Path(work) if work is not None else stack.enter_context(scratch_dir(out))
        work.mkdir(parents=True, exist_ok=True)
        dev_file = work / "device.json"
        dev_file.write_text(device_json(device))
        base = [sys.executable, "-m", "kiln.diagnose", "check", "--device-json", str(dev_file),
                "--precision", precision]
        env_path = str(Path(__file__).resolve().parent.parent)

        env = {**os.environ, "PYTHONPATH": env_path + os.pathsep + os.environ.get("PYTHONPATH", "")}

        def run_check(model: Path, stage: str, report: Path, match: str = "") -> dict:
            cmd = [*base, "--stage", stage, "--report", str(report), *(["--match", match] if match else []), str(model)]
            subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env)
            return json.loads(report.read_text())

        full = run_check(onnx_path, "build", work / "full.json")
        record = {"device": device.name, "backend": device.backend, "version": version, "precision": precision,
                  "onnx": str(onnx_path)}
        if full["code"] == PASS:
            record.update(status="not reproduced", reason=f"{device.backend} {version} parses and builds "
                                                           f"'{onnx_path.name}' here: nothing to reduce")
            write_json(out, record)
            return record
        if full["code"] == OTHER:
            record.update(status="failed", reason=f"the check itself failed: {full['message'][:500]}")
            write_json(out, record)
            return record
        stage = full["stage"]
        record.update(stage=stage, error=full["message"])
        # The failure to keep while reducing: the same op types (parser) or layers (builder) must fail.
        match = _same_failure(full["message"], _nodes(onnx_path), stage)

        static = work / "static.onnx"
        pg = _polygraphy()
        _run([*pg, "surgeon", "sanitize", str(onnx_path), "--fold-constants", "-o", str(static),
              "--override-input-shapes", *_static_shapes(onnx_path, spec)], work, "polygraphy surgeon sanitize", env)
        _run([*pg, "run", str(static), "--onnxrt", "--save-inputs", "inputs.json", "--onnx-outputs", "mark", "all",
              "--save-outputs", "golden.json"], work, "ONNX Runtime golden outputs (polygraphy run --onnxrt)", env)
        _run([*pg, "data", "merge", "inputs.json", "golden.json", "-o", "layerwise_inputs.json"], work,
             "polygraphy data merge", env)
        check_cmd = [*base, "--stage", stage, "--exact", "--report", str(work / "iteration.json"),
                     *(["--match", match] if match else []), "polygraphy_debug.onnx"]
        reduced = static
        iterations = {}
        for mode in ("bisect", "linear"):
            dst = work / f"reduced_{mode}.onnx"
            text = _run([*pg, "debug", "reduce", str(reduced), "-o", str(dst), f"--mode={mode}",
                         "--load-inputs", "layerwise_inputs.json", "--fail-code", str(FAIL),
                         "--check", *check_cmd], work, f"polygraphy debug reduce --mode={mode}", env)
            iterations[mode] = len(re.findall(r"RUNNING \| Iteration", text))
            reduced = dst
        record["reduce_iterations"] = iterations
        final = run_check(reduced, stage, work / "final.json")
        nodes = _nodes(reduced)
        message = final["message"] if final["code"] == FAIL else full["message"]
        import onnx

        opset = next((o.version for o in onnx.load(str(onnx_path), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), None)
        failing = _failing_nodes(message, nodes)
        with atomic_path(out.parent / "reduced.onnx") as tmp:
            shutil.copyfile(reduced, tmp)
        record.update(
            status="diagnosed",
            reduced_onnx=str(out.parent / "reduced.onnx"),
            reduced_nodes=nodes,
            failing_nodes=failing,
            reduced_error=message,
            hint=_hint(device.backend, version, failing, stage, message, opset),
            tool="polygraphy debug reduce (bisect, then linear), ONNX Runtime golden outputs",
            seconds=round(time.perf_counter() - t0, 1),
        )
        write_json(out, record)
        log.info("diagnose %s: %s", device.name, record["hint"])
        return record


def run_rule(cfg, device: str, model: str, precision: str, engine_record: Path, onnx_path: Path, out: Path) -> dict:
    """The rule's body: diagnose a failed build, or record that none is needed."""
    rec = read_json(engine_record)
    if rec.get("status") == "built":
        result = {"device": device, "model": model, "precision": precision, "status": "not needed"}
        write_json(out, result)
        return result
    try:
        return diagnose(onnx_path, cfg.devices[device], precision, out, spec=cfg.models[model])
    except (KilnError, subprocess.TimeoutExpired) as err:  # the summary keeps the build's own reason then
        result = {"device": device, "model": model, "precision": precision, "status": "failed",
                  "reason": str(err), "build_reason": rec.get("reason")}
        write_json(out, result)
        log.warning("diagnose %s/%s/%s could not reduce the model: %s", device, model, precision, err)
        return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return _check_main(argv[1:])
    print("usage: python -m kiln.diagnose check ONNX --device-json FILE [--stage parse|build] [--precision P]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
