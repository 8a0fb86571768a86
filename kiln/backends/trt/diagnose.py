"""Diagnosis of a failed TensorRT / TensorRT-RTX build: the smallest failing subgraph (stage `diagnose`, kiln/diagnose.py).

For a failed build (``engine.json`` status ``failed``), Kiln:

1. checks the ONNX the engine was built from again, with the device's own backend (``build()``,
   the exact code of the ``build`` rule) in a child process, and notes whether the parser or the
   builder refuses it;
2. if the nodes the parser (or builder) names have ops that neither ONNX nor ONNX Runtime knows
   (a custom domain such as ``com.example:Foo``, or a made-up op), names them as the cause straight
   from the graph: nothing needs reducing, and ONNX Runtime could not run the model anyway;
3. otherwise freezes the input shapes (batch 1) and folds constants (``polygraphy surgeon
   sanitize``), and reduces the model with ``polygraphy debug reduce`` (``--mode bisect``, then
   ``--mode linear`` on its result), each candidate checked by ``python -m kiln.backends.trt.diagnose check``
   (the same parse, or parse and build, in a fresh process: exit 1 when it fails the same way).
   The check only parses and builds, so no golden outputs are needed: Polygraphy runs ONNX
   Runtime itself only where it must fill in a tensor's shape or freeze a branch;
4. writes ``diagnosis.json``: the reduced subgraph's nodes (names, op types), the parser's or
   builder's message on it, and a hint from Kiln's op table (:mod:`kiln.backends.trt.ops`), e.g.
   "LayerNormalization at /encoder/ln_3 is not supported by TensorRT 8.5 ...: export at opset 16
   or enable decompose_layernorm". ``reduced.onnx`` lies beside it.

A build that succeeded gives ``{"status": "not needed"}`` at once. The summary's ``diagnosis``
column carries the hint. Every tool's temporary files (Polygraphy's included, through ``TMPDIR``)
go to a scratch folder beside ``diagnosis.json``, removed after; a reason in the record is one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
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
from kiln.util import atomic_path, disk_error, scratch_dir, write_json

log = logging.getLogger(__name__)

# Exit codes of `python -m kiln.backends.trt.diagnose check`: 0 builds, 1 fails at the stage asked, 2 anything else,
# 3 the disk (or quota) is full: the host's problem, never the model's.
PASS, FAIL, OTHER, DISK_FULL = 0, 1, 2, 3
CHECK_TIMEOUT_S = 600
# How the backends' parse errors name a node (kiln/backends/trt/parser.py parser_error_text).
_NAMED = re.compile(r"node (\d+) '([^']*)' \(op ([^)]*)\)")


# --------------------------------------------------------------------------------------------------
# The check one candidate gets (in its own process: one TensorRT flavor per process)


def device_json(device) -> str:
    return json.dumps(dataclasses.asdict(device))


def device_from_json(text: str):
    from kiln.specs import DeviceProfile

    data = json.loads(text)
    for f in dataclasses.fields(DeviceProfile):
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return DeviceProfile(**data)


def check(onnx_path: Path, device, precision: str, stage: str) -> tuple[int, str, str]:
    """(exit code, stage reached, message): does this device's backend parse (and build) the ONNX?"""
    from kiln import backends
    from kiln.backends.trt.importer import major_minor, polygraphy_logs, polygraphy_trt
    from kiln.backends.trt.parser import parse_onnx

    backend = backends.get(device.backend)
    flavor = backend.parser_flavor
    try:
        ns = polygraphy_trt(flavor)
        # Weakly typed only where builder flags make the precision (TensorRT < 11 on the fp32 ONNX).
        strongly = backend.strongly_typed(device) or backend.source_precision(precision, device) != "fp32" or \
            (major_minor(ns.trt.__version__) or (0, 0)) >= (11, 0)
        with polygraphy_logs():
            parse_onnx(ns, onnx_path, strongly)
    except KilnError as err:
        return FAIL, "parse", str(err)
    except Exception as err:
        if disk_error(err) is not None:
            raise
        return OTHER, "parse", _one_line(f"{type(err).__name__}: {err}")
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
            if disk_error(err) is not None:
                raise
            return OTHER, "build", _one_line(f"{type(err).__name__}: {err}")
    return PASS, "build", ""


def _check_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.backends.trt.diagnose check")
    ap.add_argument("onnx")
    ap.add_argument("--device-json", required=True, help="file holding the DeviceProfile as JSON")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--stage", choices=["parse", "build"], default="build")
    ap.add_argument("--match", default="", help="regular expression the failure message must match")
    ap.add_argument("--report", help="write {code, stage, message} here as JSON")
    ap.add_argument("--exact", action="store_true", help="a failure at another stage than --stage is not a failure")
    ap.add_argument("--unknown-ops", action="store_true",
                    help="on a failure, also report the nodes whose ops neither ONNX nor ONNX Runtime defines")
    a = ap.parse_args(argv)
    device = device_from_json(Path(a.device_json).read_text())
    code, stage, message = check(Path(a.onnx), device, a.precision, a.stage)
    if code == FAIL and a.exact and stage != a.stage:
        code = OTHER  # looking for a builder failure: a subgraph the parser refuses fails differently
    if code == FAIL and a.match and not re.search(a.match, message):
        code = OTHER  # a different failure than the one being reduced
    if a.report:
        report = {"code": code, "stage": stage, "message": message}
        if a.unknown_ops and code == FAIL:
            # Here, not in diagnose(): importing ONNX Runtime writes a file into TMPDIR, which is the scratch
            # folder only in this process.
            report["unknown_ops"] = unknown_ops(Path(a.onnx))
        Path(a.report).write_text(json.dumps(report))
    print(f"kiln diagnose check: {['pass', 'fail', 'other'][code]} at {stage}: {message[:2000]}")
    return code


# --------------------------------------------------------------------------------------------------
# The reduction


_FRAME = re.compile(r'^(Traceback \(most recent call last\)|File ".*", line \d+|[\^~ ]+$|During handling of|'
                    r'The above exception was)')


def _one_line(text: str, limit: int = 500) -> str:
    """The line of a tool's output that says why it failed, whitespace folded: Polygraphy's last error
    (``[!]``/``[E]``), else the last line that is not part of a traceback (its exception line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in reversed(lines) if ln.startswith(("[!]", "[E]"))), None)
    if pick is None:
        pick = next((ln for ln in reversed(lines) if not _FRAME.match(ln)), lines[-1] if lines else "no output")
    pick = re.sub(r"^\[[!E]\]\s*", "", pick)
    return " ".join(pick.split())[:limit]


def _run(cmd: list[str], cwd: Path, what: str, env: dict | None = None, timeout: float = CHECK_TIMEOUT_S * 4) -> str:
    log.info("diagnose: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        disk = disk_error(RuntimeError(text))
        if disk is not None:
            raise disk  # the tool could not write: the disk's problem, not the model's
        log.info("diagnose: %s output:\n%s", what, text[-20000:])  # the whole story stays in the rule's log
        raise KilnError(f"diagnose: {what} failed (exit {proc.returncode}): {_one_line(text)}")
    return text


def _polygraphy() -> list[str]:
    exe = shutil.which("polygraphy", path=os.path.dirname(sys.executable)) or shutil.which("polygraphy")
    return [exe] if exe else [sys.executable, "-m", "polygraphy"]


def _static_shapes(onnx_path: Path, spec=None) -> list[str]:
    """--override-input-shapes arguments: every dynamic axis at its smallest useful value (batch 1)."""
    from kiln.backends.trt.profile import onnx_inputs

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
    ops = [op for _, _, op in _NAMED.findall(message)]
    if ops:
        return "|".join(re.escape(f"(op {op})") for op in dict.fromkeys(ops))
    names = [n["name"] for n in nodes if n["name"] and n["name"] in message]
    return "|".join(re.escape(n) for n in dict.fromkeys(names)) if stage == "build" else ""


def _failing_nodes(message: str, nodes: list[dict]) -> list[dict]:
    """Nodes the parser's message names (node N 'name' (op X)); else every node of the reduced graph."""
    named = [(name, op) for _, name, op in _NAMED.findall(message)]
    if named:
        found = [{"name": n, "op": op} for n, op in dict.fromkeys(named)]
        return found
    # A builder message names a layer: keep the nodes whose names appear in it.
    hit = [n for n in nodes if n["name"] and n["name"] in message]
    return hit or nodes


def _hint(flavor: str, version: str, failing: list[dict], stage: str, message: str, opset: int | None) -> str:
    from kiln.backends.trt import ops as trt_ops

    hints = [trt_ops.hint(flavor, version, n["op"].split(":")[-1], n["name"], opset)
             for n in failing if n["op"].split(":")[-1] in trt_ops.RULES_BY_OP]
    if hints:
        return "; ".join(dict.fromkeys(hints))
    who = trt_ops.label(flavor, version)
    where = ", ".join(f"{n['op']} at {n['name'] or '(unnamed)'}" for n in failing[:5])
    reason = re.sub(r"\s+", " ", message.split(": ", 2)[-1])[:300]
    return (f"{where} {'is rejected by' if stage == 'parse' else 'cannot be built by'} {who} ({reason}): replace "
            f"it with a surgery pass or in the model, or build this model for another device")


# Domains whose ops ONNX's schemas or ONNX Runtime's kernels define; an op of any other is a custom op.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc")


def _op_label(node) -> str:
    return (f"{node.domain}:" if node.domain not in ("", "ai.onnx") else "") + node.op_type


def _ort_ops() -> set[tuple[str, str]]:
    """(domain, op) of every kernel this ONNX Runtime has; empty when its build does not list them."""
    try:
        from onnxruntime.capi import _pybind_state as ort_c

        return {(k.domain, k.op_name) for k in ort_c.get_all_opkernel_def()}
    except Exception:  # noqa: BLE001  another ONNX Runtime build: ONNX's schemas alone decide then
        return set()


def unknown_ops(onnx_path: Path) -> list[dict]:
    """Nodes of the top graph whose op neither ONNX's schemas, ONNX Runtime's kernels nor the model's own
    functions define: a custom-domain op (``com.example:Foo``) or a made-up one. {index, name, op, custom}."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    local = {(f.domain, f.name) for f in model.functions}
    ort = _ort_ops()
    found = []
    for i, n in enumerate(model.graph.node):
        domain = "" if n.domain == "ai.onnx" else n.domain
        if onnx.defs.has(n.op_type, domain) or (domain, n.op_type) in ort or (n.domain, n.op_type) in local:
            continue
        found.append({"index": i, "name": n.name, "op": _op_label(n), "custom": domain not in STANDARD_DOMAINS})
    return found


def _culprits(message: str, stage: str, unknown: list[dict]) -> tuple[list[dict], list[dict]]:
    """(unknown-op nodes the failure names, the other nodes it names): the parser names nodes as
    ``node N 'name' (op X)``; the builder names layers, so there an unknown-op node's name in its message."""
    named = list(dict.fromkeys((name, op) for _, name, op in _NAMED.findall(message)))
    if not named:
        return ([n for n in unknown if n["name"] and n["name"] in message] if stage == "build" else []), []
    by_key = {(n["name"], n["op"]): n for n in unknown}
    return ([by_key[k] for k in named if k in by_key],
            [{"name": name, "op": op} for name, op in named if (name, op) not in by_key])


def _unknown_hint(flavor: str, version: str, nodes: list[dict], opset: int | None) -> str:
    """Kiln's op table's advice for the plugin ops it lists (EfficientNMS_TRT); for the others, what they are
    and the fix."""
    from kiln.backends.trt import ops as trt_ops

    listed = [n for n in nodes if n["op"].split(":")[-1] in trt_ops.RULES_BY_OP]
    parts = [trt_ops.hint(flavor, version, n["op"].split(":")[-1], n["name"], opset) for n in listed]
    rest = [n for n in nodes if n not in listed]
    if rest:
        who = trt_ops.label(flavor, version)
        lines = [f"node {n['index']} '{n['name']}' (op {n['op']}): "
                 f"{'custom-domain op' if n['custom'] else f'op that ONNX (opset {opset}) does not define'} with no "
                 f"kernel/plugin: {who} has no plugin for it and ONNX Runtime no kernel" for n in rest]
        ops = ", ".join(dict.fromkeys(n["op"] for n in rest))
        parts.append("; ".join(lines) + f": register a TensorRT plugin for {ops} on this device (and an ONNX "
                     f"Runtime custom-op library for validation), or replace it with standard ONNX ops in the "
                     f"export or a surgery pass, or build this model for another device")
    return "; ".join(dict.fromkeys(parts))


def _subgraph(onnx_path: Path, names: set[str], dst: Path) -> None:
    """The named nodes alone as a model (their other inputs made graph inputs), written to `dst`."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    try:
        model = onnx.shape_inference.infer_shapes(model)  # types of the nodes' inputs, where ONNX knows them
    except Exception:  # noqa: BLE001  (a model over 2 GB, a broken shape): inputs go untyped then
        pass
    g = model.graph
    typed = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    weights = {t.name: t for t in g.initializer}
    nodes = [n for n in g.node if n.name in names]
    made = {o for n in nodes for o in n.output}
    inputs, inits, seen = [], [], set()
    for n in nodes:
        for name in n.input:
            if not name or name in made or name in seen:
                continue
            seen.add(name)
            if name in weights:
                inits.append(weights[name])
            else:
                inputs.append(typed.get(name) or helper.make_empty_tensor_value_info(name))
    outputs = [typed.get(o) or helper.make_empty_tensor_value_info(o) for n in nodes for o in n.output if o]
    sub = helper.make_model(helper.make_graph(nodes, f"{g.name or 'graph'}_failing", inputs, outputs,
                                              initializer=inits),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.save(sub, str(dst))


def _opset(onnx_path: Path) -> int | None:
    import onnx

    return next((o.version for o in onnx.load(str(onnx_path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx")), None)


def diagnose(onnx_path: Path, device, precision: str, out: Path, spec=None, work: Path | None = None) -> dict:
    """Reduce a model the device's backend refuses to its smallest failing subgraph; write ``out`` (JSON)."""
    from kiln import backends

    onnx_path, out = Path(onnx_path).resolve(), Path(out).resolve()
    if not backends.get(device.backend).diagnoses:
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
        # The tools' own temporaries too (Polygraphy leaves a shape-inferred copy of the whole model in the
        # temporary folder): TMPDIR is inside the scratch folder, removed with it.
        tmp_dir = work / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        dev_file = work / "device.json"
        dev_file.write_text(device_json(device))
        base = [sys.executable, "-m", "kiln.backends.trt.diagnose", "check", "--device-json", str(dev_file),
                "--precision", precision]
        env_path = str(Path(__file__).resolve().parents[3])  # the checkout holding the kiln package

        env = {**os.environ, "PYTHONPATH": env_path + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TMPDIR": str(tmp_dir), "TEMP": str(tmp_dir), "TMP": str(tmp_dir)}

        def run_check(model: Path, stage: str, report: Path, match: str = "", *flags: str) -> dict:
            cmd = [*base, "--stage", stage, "--report", str(report), *(["--match", match] if match else []), *flags,
                   str(model)]
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env)
            if proc.returncode == DISK_FULL:
                raise disk_error(RuntimeError(proc.stderr)) or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                                                       str(work))
            if not report.is_file():  # the check process died (a crash in the parser, say)
                raise KilnError(f"diagnose: the check of '{model.name}' ended with exit {proc.returncode} and "
                                f"no report: {_one_line(proc.stdout + proc.stderr)}")
            rep = json.loads(report.read_text())
            rep["message"] = " ".join(rep["message"].split())  # one line, as every reason in the record
            return rep

        def publish(model: Path) -> Path:
            """The smallest failing model, beside `out` (a scratch path would be gone after)."""
            with atomic_path(out.parent / "reduced.onnx") as tmp:
                shutil.copyfile(model, tmp)
            return out.parent / "reduced.onnx"

        full = run_check(onnx_path, "build", work / "full.json", "", "--unknown-ops")
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
        opset = _opset(onnx_path)

        # An op nobody knows, named by the parser: the cause, straight from the graph. Reducing would need
        # ONNX Runtime to run the model (for the shapes past that op), which it cannot.
        culprits, others = _culprits(full["message"], stage, full.get("unknown_ops", []))
        if culprits:
            failing = [{"name": n["name"], "op": n["op"]} for n in culprits] + others
            _subgraph(onnx_path, {n["name"] for n in failing}, work / "alone.onnx")
            alone = run_check(work / "alone.onnx", stage, work / "alone.json")  # do they fail alone, the same way?
            reduced_onnx = publish(work / "alone.onnx")
            hint = _unknown_hint(backends.get(device.backend).parser_flavor, version, culprits, opset)
            if others:  # known ops the parser refuses beside them: Kiln's op table on those
                hint += "; " + _hint(backends.get(device.backend).parser_flavor, version, others, stage, full["message"], opset)
            record.update(
                status="diagnosed",
                reduced_onnx=str(reduced_onnx),
                reduced_nodes=failing,
                failing_nodes=failing,
                reduced_error=(alone["message"] if alone["code"] == FAIL else full["message"]).replace(
                    str(work / "alone.onnx"), str(reduced_onnx)),
                hint=hint,
                tool="the graph: ops that neither ONNX, ONNX Runtime nor the model's functions define, named by "
                     "the parser; no reduction needed",
                seconds=round(time.perf_counter() - t0, 1),
            )
            write_json(out, record)
            log.info("diagnose %s: %s", device.name, record["hint"])
            return record

        # The failure to keep while reducing: the same op types (parser) or layers (builder) must fail.
        match = _same_failure(full["message"], _nodes(onnx_path), stage)

        static = work / "static.onnx"
        pg = _polygraphy()
        _run([*pg, "surgeon", "sanitize", str(onnx_path), "--fold-constants", "-o", str(static),
              "--override-input-shapes", *_static_shapes(onnx_path, spec)], work, "polygraphy surgeon sanitize", env)
        check_cmd = [*base, "--stage", stage, "--exact", "--report", str(work / "iteration.json"),
                     *(["--match", match] if match else []), "polygraphy_debug.onnx"]
        reduced = static
        iterations = {}
        for mode in ("bisect", "linear"):
            dst = work / f"reduced_{mode}.onnx"
            text = _run([*pg, "debug", "reduce", str(reduced), "-o", str(dst), f"--mode={mode}",
                         "--fail-code", str(FAIL), "--check", *check_cmd], work,
                        f"polygraphy debug reduce --mode={mode}", env)
            iterations[mode] = len(re.findall(r"RUNNING \| Iteration", text))
            reduced = dst
        record["reduce_iterations"] = iterations
        final = run_check(reduced, stage, work / "final.json")
        nodes = _nodes(reduced)
        message = final["message"] if final["code"] == FAIL else full["message"]
        failing = _failing_nodes(message, nodes)
        reduced_onnx = publish(reduced)
        record.update(
            status="diagnosed",
            reduced_onnx=str(reduced_onnx),
            reduced_nodes=nodes,
            failing_nodes=failing,
            reduced_error=message.replace(str(reduced), str(reduced_onnx)),
            hint=_hint(backends.get(device.backend).parser_flavor, version, failing, stage, message, opset),
            tool="polygraphy debug reduce (bisect, then linear)",
            seconds=round(time.perf_counter() - t0, 1),
        )
        write_json(out, record)
        log.info("diagnose %s: %s", device.name, record["hint"])
        return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        try:
            return _check_main(argv[1:])
        except Exception as err:  # an uncaught error exits 1, which Polygraphy would read as "fails the same way"
            disk = disk_error(err)
            # "[Errno 28] ...: 'path'": the parent reads the disk error back from this line
            print(f"kiln diagnose check: {disk if disk is not None else _one_line(f'{type(err).__name__}: {err}')}",
                  file=sys.stderr)
            return OTHER if disk is None else DISK_FULL
    print("usage: python -m kiln.backends.trt.diagnose check ONNX --device-json FILE [--stage parse|build] [--precision P]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
