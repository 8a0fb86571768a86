"""The backend contract (kiln/backends/base.py): a backend from another package joins through the registry
alone, a backend that lacks part of the contract fails loudly, and nothing outside kiln/backends/ knows a
backend by its name."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln import backends
from kiln.backends.base import Backend
from kiln.errors import KilnError
from tests.conftest import REPO, tiny_config, write_config

PLUGIN = '''
"""A minimal backend, defined outside Kiln: its "engine" is the ONNX file itself, run by ONNX Runtime."""
import shutil
from pathlib import Path

from kiln.backends.base import Backend, Runner


class EchoRunner(Runner):
    def __init__(self, path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def infer(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))


class EchoBackend(Backend):
    name = "echo"
    label = "Echo"

    def is_available(self):
        return True

    def version(self):
        return "0.1"

    def check_device(self, device):
        return [f"precision '{p}' is not echoed: use fp32" for p in device.precisions if p != "fp32"]

    def check_host(self, device):
        return None

    def check_build_host(self, device):
        return None

    def needs_gpu(self, device, rule):
        return False

    def build(self, onnx_path, engine_path, device, precision, threads=0, **extra):
        shutil.copyfile(onnx_path, engine_path)
        return {"builder": "echo 0.1"}

    def load_runner(self, engine_path, device, threads=0):
        return EchoRunner(Path(engine_path))


class HalfBackend(Backend):
    """Lacks build and load_runner."""
    name = "half"
    label = "Half"

    def is_available(self):
        return True

    def version(self):
        return "0"

    def check_device(self, device):
        return []

    def check_host(self, device):
        return None

    def check_build_host(self, device):
        return None
'''


@pytest.fixture
def plugin_path(tmp_path) -> Path:
    """A package registering the 'echo' (and the incomplete 'half') backend through its entry points."""
    site = tmp_path / "site"
    (site / "kiln_echo_backend").mkdir(parents=True)
    (site / "kiln_echo_backend" / "__init__.py").write_text(PLUGIN)
    info = site / "kiln_echo_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kiln-echo-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[kiln.backends]\necho = kiln_echo_backend:EchoBackend\nhalf = kiln_echo_backend:HalfBackend\n")
    return site


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _echo_config(workdir: Path, precisions=("fp32",)) -> Path:
    cfg = tiny_config()
    cfg["devices"] = {"echo": {"backend": "echo", "opset": 17, "precisions": list(precisions), "batch_sizes": [1]}}
    return write_config(workdir / "echo.yaml", cfg)


def test_a_backend_from_another_package_checks_and_plans(plugin_path, workdir):
    """Registered by an entry point, touching no file of Kiln: `kiln check` and a dry run take it."""
    cfgfile = _echo_config(workdir)
    check = subprocess.run([sys.executable, "-m", "kiln.cli", "check", str(cfgfile)], cwd=workdir,
                           env=_env(plugin_path), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert "yolo_demo            echo             fp32   built and validated here" in lines
    assert lines[-1] == f"{cfgfile}: OK, 2 jobs"
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                          "--configfile", str(cfgfile), "--directory", str(workdir)],
                         env=_env(plugin_path), capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-3000:]
    for rule, count in (("build", 2), ("validate", 2), ("baseline", 2), ("reference", 2), ("summary", 1)):
        assert any(line.split() == [rule, str(count)] for line in dry.stdout.splitlines()), (rule, dry.stdout)
    assert not any(line.split()[:1] == ["diagnose"] for line in dry.stdout.splitlines())  # echo diagnoses nothing


def test_the_plugins_own_check_refuses_with_its_message(plugin_path, workdir):
    cfgfile = _echo_config(workdir, ("fp32", "fp16"))
    check = subprocess.run([sys.executable, "-m", "kiln.cli", "check", str(cfgfile)], cwd=workdir,
                           env=_env(plugin_path), capture_output=True, text=True, timeout=300)
    assert check.returncode == 1
    assert check.stderr.strip() == "kiln: config: 'devices.echo': precision 'fp16' is not echoed: use fp32"


def test_a_backend_lacking_part_of_the_contract_fails_loudly(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_path))
    backends.registry.cache_clear()
    backends.get.cache_clear()
    try:
        assert "echo" in backends.names() and isinstance(backends.get("echo"), Backend)
        with pytest.raises(KilnError, match=r"backend 'half' \('kiln_echo_backend:HalfBackend'\) does not implement "
                                            r"the backend contract: .*build.*load_runner"):
            backends.get("half")
    finally:
        backends.registry.cache_clear()
        backends.get.cache_clear()


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(KilnError, match="unknown backend 'tensorrtx': use one of onnxruntime, tensorrt, tensorrt-rtx"):
        backends.get("tensorrtx")


def _backend_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """`x == "tensorrt"`, `x in ("onnxruntime", ...)`, `{"tensorrt": ...}` in one module (docstrings aside)."""
    found = []
    tree = ast.parse(path.read_text(), str(path))

    def named(node) -> bool:
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and (named(node.left) or any(named(c) for c in node.comparators)):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(k is not None and named(k) for k in node.keys):
            found.append(f"{path}:{node.lineno}: a dict keyed by backend names")
        elif isinstance(node, ast.Match):
            found.append(f"{path}:{node.lineno}: match statement")
    return found


def test_no_module_outside_backends_compares_a_backend_name():
    names = set(backends.BACKENDS)
    modules = [p for p in (REPO / "kiln").rglob("*.py") if "backends" not in p.relative_to(REPO / "kiln").parts]
    found = [hit for p in modules for hit in _backend_name_comparisons(p, names)]
    assert found == []


def test_the_name_check_finds_what_it_looks_for(tmp_path):
    """The check above can fail: it finds each kind of comparison in a module that has them."""
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent('''
        """A docstring naming tensorrt is fine."""
        def f(d):
            if d.backend == "tensorrt-rtx":
                return 1
            return d.backend in ("onnxruntime", "x"), {"tensorrt": 1}
    '''))
    assert len(_backend_name_comparisons(src, set(backends.BACKENDS))) == 3


def test_no_stage_imports_another_stage():
    """The floors: a stage's code (its static import closure) holds no other stage's module, so an edit to
    one stage reruns only its own jobs and what consumes their outputs (tests/test_reruns.py)."""
    from kiln import fingerprint
    from kiln.workflow import STAGES

    stages = set(STAGES.values())
    crossing = {stage: sorted(m for m in fingerprint.closure(stage) if m in stages and m != stage
                              and not stage.startswith(m + ".") and not m.startswith(stage + "."))
                for stage in stages}
    assert {s: c for s, c in crossing.items() if c} == {}
