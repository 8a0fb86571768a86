"""requirements.lock: the whole dev/CI environment pinned, agreeing with pyproject.toml and kiln.lock."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from kiln import envlock
from kiln.util import read_json
from tests.conftest import REPO

LOCK = REPO / "requirements.lock"


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def test_lock_pins_every_requirement_within_pyprojects_ranges():
    pins = envlock.read(LOCK)
    for req in _pyproject_requirements():
        name = envlock.canonical(req.name)
        assert name in pins, f"{req.name} is a requirement in pyproject.toml but requirements.lock has no pin"
        # A local version label (torch 2.13.0+cpu) satisfies its public version's range.
        assert req.specifier.contains(pins[name].split("+")[0], prereleases=True), (req, pins[name])


def test_lock_is_exact_and_complete():
    text = LOCK.read_text()
    pins = envlock.read(LOCK)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == len(pins) and all("==" in ln and ">" not in ln and "<" not in ln for ln in lines)
    # Transitive packages are there too: ModelOpt's, Snakemake's and torch's own requirements.
    for transitive in ("sympy", "networkx", "pulp", "ml-dtypes", "protobuf", "jinja2"):
        assert transitive in pins, transitive
    assert envlock.read(LOCK, target=True).keys() == {"tensorrt-stubs"}  # installed with --target, not into the venv


def test_kiln_lock_was_written_in_the_locked_environment():
    """kiln.lock's environment section names exactly requirements.lock's pins."""
    packages = read_json(REPO / "kiln.lock")["environment"]["packages"]
    assert packages == envlock.read(LOCK)


def test_differences_name_every_kind_of_drift(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nonnxruntime==1.31.1\nnumpy==2.4.6\nonnx==1.23.2\n#@target tensorrt-stubs==1\n")
    have = {"onnxruntime": "1.32.0", "numpy": "2.4.6", "polars": "1.0"}
    assert envlock.differences(lock, have) == [
        "onnx: not installed (the lock has 1.23.2)",
        "onnxruntime: 1.32.0 installed, the lock has 1.31.1",
        "polars 1.0: installed, not in the lock",
    ]
    assert envlock.differences(lock, {"onnxruntime": "1.31.1", "numpy": "2.4.6", "onnx": "1.23.2"}) == []


def test_check_command_warns_and_strict_fails(tmp_path):
    lock = tmp_path / "requirements.lock"
    pins = {**envlock.installed(), "onnxruntime": "0.0.1"}
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    run = [sys.executable, "-m", "kiln.envlock", "check", str(lock)]
    warn = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert warn.returncode == 0
    assert "1 installed package(s) differ" in warn.stderr
    assert f"onnxruntime: {envlock.installed()['onnxruntime']} installed, the lock has 0.0.1" in warn.stderr
    assert subprocess.run([*run, "--strict"], cwd=REPO, capture_output=True).returncode == 1
    lock.write_text("onnxruntime>=1\n")
    bad = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "is not NAME==VERSION" in bad.stderr and "Traceback" not in bad.stderr


def test_freeze_round_trips(tmp_path):
    out = tmp_path / "lock"
    n = envlock.freeze(out)
    assert n == len(envlock.installed()) and envlock.read(out) == envlock.installed()
    assert envlock.differences(out) == []


@pytest.mark.parametrize("name", ["Onnx_GraphSurgeon", "onnx.graphsurgeon", "ONNX-graphsurgeon"])
def test_names_are_compared_canonically(name):
    assert envlock.canonical(name) == "onnx-graphsurgeon"
