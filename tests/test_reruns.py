"""A code edit reruns only the jobs it can change: each kiln module, edited, against an expected table.

In a copy of the workflow whose demo run is finished (every output made and recorded by Snakemake),
one module at a time gets an unused function appended. The jobs whose code changes are those that
`kiln.workflow.Plan.code` gives another fingerprint (or, for a model's factory module, whose export and
baseline spec params change), for every module of the package; for one
module of each floor a real `snakemake -n` shows the jobs it plans, and which of them it plans
because their code changed ("Params have changed") rather than because an input will be remade.
The same table is in docs/performance.md ("Code edits and reruns").
"""

from __future__ import annotations

import collections
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# The demo's jobs per rule (config.yaml on a CPU host): 51, with `all`.
DEMO = {"dataset": 2, "inputs": 4, "export": 2, "simplify": 2, "surgery": 2, "precision": 4, "quantize": 2,
        "reference": 2, "build": 12, "diagnose": 6, "baseline": 2, "validate": 6, "serve": 2, "summary": 1, "page": 1}

# Module edited -> {rule: jobs whose code fingerprint changes}; a module not listed changes none.
EXPECTED = {
    # Stages: their own jobs.
    'kiln/baseline.py': {'baseline': 2},
    'kiln/build.py': {'build': 12},
    'kiln/dataset.py': {'dataset': 2},
    'kiln/diagnose.py': {'diagnose': 6},
    'kiln/export.py': {'export': 2},
    'kiln/inputs.py': {'inputs': 4},
    'kiln/precision/autocast.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/cast.py': {'precision': 4},
    'kiln/precision/castvariant.py': {'precision': 4},
    'kiln/precision/checks.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/graph.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/modelopt_log.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/options.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/ptq.py': {'quantize': 2},
    'kiln/precision/quantize.py': {'quantize': 2},
    'kiln/precision/records.py': {'precision': 4, 'quantize': 2},
    'kiln/precision/variant.py': {'precision': 4, 'quantize': 2},
    'kiln/reference.py': {'reference': 2},
    'kiln/report/__init__.py': {'page': 1},
    'kiln/report/data.py': {'page': 1},
    'kiln/report/page.py': {'page': 1},
    'kiln/report/plots.py': {'page': 1},
    'kiln/serve/__init__.py': {'serve': 2},
    'kiln/serve/deepstream.py': {'serve': 2},
    'kiln/serve/triton.py': {'serve': 2},
    'kiln/simplify.py': {'simplify': 2},
    'kiln/summary.py': {'summary': 1},
    'kiln/surgery.py': {'surgery': 2},
    'kiln/validate/__init__.py': {'validate': 6},
    'kiln/validate/pictures.py': {'validate': 6},
    'kiln/validate/pipeline.py': {'validate': 6},
    'kiln/validate/streams.py': {'validate': 6},
    # Backends: their own devices' jobs (the reference runs on ONNX Runtime's CPU provider by design; the
    # CUDA provider's guard uses the shared GPU probe in backends/trt/host.py; no TensorRT device is built
    # or run on this host, so its module changes none here).
    'kiln/backends/__init__.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'serve': 2, 'surgery': 2, 'validate': 6},
    'kiln/backends/base.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'serve': 2, 'surgery': 2, 'validate': 6},
    'kiln/backends/cuda.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/onnxruntime.py': {'baseline': 2, 'build': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/ort_capabilities.py': {'baseline': 2, 'build': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/ort_cuda.py': {'baseline': 2, 'build': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/tensorrt_rtx.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/__init__.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/trt/backend.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/builder.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/diagnose.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/host.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/trt/importer.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/trt/io.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/layers.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/ops.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'reference': 2, 'validate': 6},
    'kiln/backends/trt/parser.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/profile.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/runner.py': {'build': 6, 'diagnose': 6},
    'kiln/backends/trt/trtexec.py': {'build': 6, 'diagnose': 6},
    # Model sources and dataset generators: the jobs of the models and datasets that use them.
    'kiln/demo/models.py': {'baseline': 2, 'export': 2},
    'kiln/demo/shapes.py': {'dataset': 2},
    'kiln/sources/__init__.py': {'baseline': 2, 'export': 2},
    'kiln/sources/factories.py': {'baseline': 2, 'export': 2},
    'kiln/sources/torch.py': {'baseline': 2, 'export': 2},
    # Shared helpers below the stages: exactly the stages that import them.
    'kiln/__init__.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'export': 2, 'page': 1, 'quantize': 2, 'reference': 2, 'serve': 2, 'summary': 1, 'surgery': 2, 'validate': 6},
    'kiln/accuracy.py': {'reference': 2, 'validate': 6},
    'kiln/batches.py': {'baseline': 2, 'quantize': 2, 'reference': 2, 'validate': 6},
    'kiln/cache.py': {'baseline': 2, 'build': 6, 'export': 2, 'reference': 2, 'validate': 6},
    'kiln/classes.py': {'export': 2, 'reference': 2, 'validate': 6},
    'kiln/coco.py': {'build': 12, 'dataset': 2, 'inputs': 4, 'validate': 6},
    'kiln/draw.py': {'validate': 6},
    'kiln/errors.py': {'baseline': 2, 'build': 12, 'dataset': 2, 'diagnose': 6, 'export': 2, 'inputs': 4, 'page': 1, 'precision': 4, 'quantize': 2, 'reference': 2, 'serve': 2, 'summary': 1, 'surgery': 2, 'validate': 6},
    'kiln/findings.py': {'diagnose': 6, 'page': 1, 'summary': 1, 'validate': 6},
    'kiln/fingerprint.py': {'baseline': 2, 'export': 2},
    'kiln/integrity.py': {'build': 12, 'diagnose': 6, 'reference': 2, 'serve': 2, 'summary': 1, 'validate': 6},
    'kiln/latency.py': {'baseline': 2, 'validate': 6},
    'kiln/metrics.py': {'reference': 2, 'validate': 6},
    'kiln/numerics.py': {'export': 2},
    'kiln/parity.py': {'validate': 6},
    'kiln/paths.py': {'baseline': 2, 'build': 12, 'diagnose': 6, 'page': 1, 'quantize': 2, 'serve': 2, 'summary': 1, 'validate': 6},
    'kiln/postprocess.py': {'reference': 2, 'validate': 6},
    'kiln/preprocess.py': {'baseline': 2, 'inputs': 4, 'quantize': 2, 'reference': 2, 'validate': 6},
    'kiln/specs.py': {'baseline': 2, 'build': 12, 'dataset': 2, 'diagnose': 6, 'export': 2, 'inputs': 4, 'page': 1, 'quantize': 2, 'reference': 2, 'serve': 2, 'summary': 1, 'validate': 6},
    'kiln/streams.py': {'validate': 6},
    'kiln/util.py': {'baseline': 2, 'build': 12, 'dataset': 2, 'diagnose': 6, 'export': 2, 'inputs': 4, 'page': 1, 'precision': 4, 'quantize': 2, 'reference': 2, 'serve': 2, 'simplify': 2, 'summary': 1, 'surgery': 2, 'validate': 6},
}
# Modules that change no job of the demo: what plans and checks (config, workflow, CLI, lock), what no demo
# job runs (the TensorRT backend, the Ultralytics and RT-DETR sources, sensitivity and fallback, which the
# demo does not ask for, the runtime and `kiln predict`, the trainer), and package markers.
CHANGE_NOTHING = (
    'kiln/backends/tensorrt.py',
    'kiln/cli.py',
    'kiln/compare.py',
    'kiln/config.py',
    'kiln/demo/__init__.py',
    'kiln/demo/train.py',
    'kiln/entry.py',
    'kiln/envlock.py',
    'kiln/fp16_emulation.py',
    'kiln/judge.py',
    'kiln/lock.py',
    'kiln/precision/__init__.py',
    'kiln/precision/fallback.py',
    'kiln/predict.py',
    'kiln/runtime.py',
    'kiln/sensitivity.py',
    'kiln/sources/rtdetr.py',
    'kiln/sources/ultralytics.py',
    'kiln/workflow.py',
)
# One module of each floor also goes through a real dry run.
DRY_RUN = ("kiln/sources/ultralytics.py", "kiln/backends/onnxruntime.py", "kiln/report/plots.py",
           "kiln/demo/shapes.py", "kiln/latency.py", "kiln/precision/quantize.py", "kiln/config.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("workflow_overhead", REPO / "bench" / "workflow_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(bench, work: Path, snakefile: Path) -> dict[str, collections.Counter]:
    """Per rule, the jobs a dry run plans by their reason: "params" (their code or spec changed),
    "input" (an input will be remade first) or "other"."""
    proc = subprocess.run(bench.snakemake_cmd(work, snakefile, "-n"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reasons = {"params": collections.Counter(), "input": collections.Counter(), "other": collections.Counter()}
    rule = None
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("reason:"):
            if rule != "all":
                kind = ("params" if "Params have changed" in line else
                        "input" if "Input files updated by another job" in line else "other")
                reasons[kind][rule] += 1
            rule = None
    return {k: dict(v) for k, v in reasons.items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A copy of the workflow and a demo run of it whose every output exists and is recorded."""
    bench = _load_bench()
    root = tmp_path_factory.mktemp("reruns")
    code, work = root / "workflow", root / "work"
    code.mkdir()
    work.mkdir()
    snakefile = bench.snapshot(code)
    shutil.copytree(REPO / "models", work / "models")
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    proc = subprocess.run(bench.snakemake_cmd(work, snakefile, "-n"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = bench.parse_jobs(proc.stdout)
    out = subprocess.run([sys.executable, "-c", bench.RULES_OF, str(work), str(snakefile)], capture_output=True,
                         text=True, timeout=600)
    import json

    rules = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RULES="))[len("RULES="):])
    bench.populate(work, snakefile, jobs, rules)
    return bench, code, work, snakefile, jobs


# Run in the copy's own interpreter: its kiln package, its plan. For each module: edit it, forget every
# cached fingerprint, take every job's code param as the rules do (Plan.code), and put the module back.
EDIT_EACH = """
import collections, functools, json, os, sys
code, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, code)
os.chdir(work)
from pathlib import Path
from kiln import baseline, export, fingerprint, workflow
from kiln.config import read_yaml

plan = workflow.Plan.create(read_yaml("config.yaml"), ["config.yaml"])
jobs = [j for j in json.load(sys.stdin) if j["rule"] in workflow.STAGES]

def codes():
    for f in (fingerprint.closure, fingerprint.code_fingerprint, fingerprint._kiln_imports, fingerprint._module_file):
        f.cache_clear()
    plan._code.clear()
    out = []
    for j in jobs:
        c = plan.code(j["rule"])
        w = j["wildcards"]
        key = [c if isinstance(c, str) else c(w)]
        # The model's own code (its factory's module) is tracked by these rules' spec params.
        if j["rule"] == "export":
            key.append(export.params(plan.cfg, w["model"]))
        elif j["rule"] == "baseline":
            key.append(baseline.params(plan.cfg, w["device"], w["model"]))
        out.append(json.dumps(key, sort_keys=True))
    return out

before = codes()
table = {}
for path in sorted(Path(code, "kiln").rglob("*.py")):
    original = path.read_text()
    path.write_text(original + "\\n\\ndef _unused_edit_for_the_rerun_test():\\n    return None\\n")
    try:
        after = codes()
    finally:
        path.write_text(original)
    changed = collections.Counter(j["rule"] for j, b, a in zip(jobs, before, after) if b != a)
    table[path.relative_to(code).as_posix()] = dict(sorted(changed.items()))
print("TABLE=" + json.dumps(table))
"""


def _edit(path: Path):
    original = path.read_text()
    path.write_text(original + "\n\ndef _unused_edit_for_the_rerun_test():\n    return None\n")
    return original


def test_demo_run_is_finished(finished):
    bench, code, work, snakefile, jobs = finished
    assert collections.Counter(j["rule"] for j in jobs if j["rule"] != "all") == DEMO
    assert _dry_run(bench, work, snakefile) == {"params": {}, "input": {}, "other": {}}


def test_every_module_reruns_only_what_it_can_change(finished):
    """Every module of the package, edited in turn: the jobs whose code changes are the table's, and a
    module the table does not name changes none."""
    import json

    bench, code, work, snakefile, jobs = finished
    proc = subprocess.run([sys.executable, "-c", EDIT_EACH, str(code), str(work)], input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("TABLE="))[len("TABLE="):])
    assert set(EXPECTED) | set(CHANGE_NOTHING) == set(table), set(table) ^ (set(EXPECTED) | set(CHANGE_NOTHING))
    wrong = {m: {"got": table[m], "expected": EXPECTED.get(m, {})} for m in table if table[m] != EXPECTED.get(m, {})}
    assert wrong == {}


@pytest.mark.parametrize("module", DRY_RUN)
def test_snakemake_plans_those_jobs(finished, module):
    """Snakemake itself: the jobs it plans because their code changed are the table's (those not already
    planned for a remade input), every other job it plans follows from a remade input, and each of the
    table's jobs is planned."""
    bench, code, work, snakefile, jobs = finished
    path = code / module
    original = _edit(path)
    try:
        got = _dry_run(bench, work, snakefile)
    finally:
        path.write_text(original)
    want = EXPECTED.get(module, {})
    assert got["other"] == {}
    assert all(n <= want.get(rule, 0) for rule, n in got["params"].items()), (got, want)
    planned = collections.Counter(got["params"]) + collections.Counter(got["input"])
    assert all(planned[rule] >= n for rule, n in want.items()), (got, want)
    if not want:
        assert planned == {}
