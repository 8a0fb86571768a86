"""The trust boundary: what the config names is never imported or unpickled while checking or planning.

Factories come only from the places ``trusted_factories`` declares (found on disk, not imported);
checkpoints are checked at config load without unpickling code (a pass is cached, keyed by the
file, so a later load imports no torch); each refusal is one line naming the key and the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kiln import export, sources
from kiln.cache import cache_dir
from kiln.config import load
from kiln.errors import KilnError
from kiln.fingerprint import file_fingerprint
from kiln.sources import factories
from kiln.sources.torch import factory
from tests.conftest import REPO, tiny_config, write_config

# A module that leaves a marker file beside itself if anything imports it.
MARKED = 'open(__file__ + ".imported", "w").write("imported")\n'
FACTORIES = MARKED + textwrap.dedent('''
    import torch
    from os import system


    def build(**kwargs):
        return torch.nn.Conv2d(3, 4, 1)


    def not_a_model(**kwargs):
        return 42
''')


class Pwn:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def one_model(checkpoint, factory="kiln.demo.models:yolo_demo", **extra) -> dict:
    raw = tiny_config(checkpoint_yolo=str(checkpoint))
    raw["models"] = {"m": {**raw["models"]["yolo_demo"], "factory": factory, **extra}}
    raw["devices"] = {"cpu": {**raw["devices"]["cpu"], "precisions": ["fp32"]}}
    return raw


@pytest.fixture
def ckpts(tmp_path):
    """A good state_dict, a truncated copy, a code-running pickle, a directory; and the pickle's marker."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4, 4), "b": torch.zeros(4)}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "x": Pwn(marker)}, tmp_path / "pwn.pt")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "best.pt").write_bytes(data)
    return tmp_path, marker


def refusal(raw, base) -> str:
    with pytest.raises(KilnError) as err:
        load(raw, base=base)
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Checkpoints, at config load


def test_good_checkpoint_passes_the_config_check(ckpts):
    tmp, _ = ckpts
    assert load(one_model("good.pt"), base=tmp).models["m"].checkpoint == "good.pt"


def test_truncated_checkpoint_is_refused_at_load(ckpts):
    tmp, _ = ckpts
    assert refusal(one_model("truncated.pt"), tmp).startswith(
        f"config: 'models.m.checkpoint': '{tmp}/truncated.pt' is truncated or damaged: it begins as a zip archive "
        f"(torch.save's format) but its zip directory, at the end of the file, cannot be read")


def test_code_running_pickle_is_refused_at_load_naming_the_global_and_never_runs(ckpts, monkeypatch):
    tmp, marker = ckpts
    monkeypatch.chdir(tmp)
    msg = refusal(one_model("pwn.pt"), tmp)
    assert msg.startswith(f"config: 'models.m.checkpoint': '{tmp}/pwn.pt' is not a weights-only state_dict "
                          f"(Trying to load unsupported GLOBAL posix.system whose module posix is blocked): ")
    assert "set 'models.m.trust_checkpoint: true' only if you trust where the file comes from" in msg
    # Trusted: accepted at load on its zip structure alone, still not unpickled.
    assert load(one_model("pwn.pt", trust_checkpoint=True), base=tmp).models["m"].trust_checkpoint
    # The export job refuses it the same way, with torch's detail kept.
    spec = load(one_model(tmp / "pwn.pt"), base=tmp, check_paths=False).models["m"]
    with pytest.raises(KilnError, match=r"^checkpoint '.*pwn.pt' is not a weights-only state_dict \(Trying to load "
                                        r"unsupported GLOBAL posix.system"):
        sources.load_checkpoint(spec.checkpoint, "m")
    assert not marker.exists()


def test_directory_as_checkpoint_says_what_is_expected(ckpts):
    tmp, _ = ckpts
    assert refusal(one_model("weights"), tmp) == (
        f"config: 'models.m.checkpoint': '{tmp}/weights' is a directory, not a checkpoint file: point "
        f"'models.m.checkpoint' at the file torch.save wrote (a .pt or .pth; this folder holds best.pt)")


LOAD_DEMO = """
import sys
import kiln.config
kiln.config.load_file("config.yaml", base=".")
print("torch imported:", "torch" in sys.modules)
"""


def test_a_checked_checkpoint_is_not_checked_again_and_config_load_imports_no_torch(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILN_CACHE_DIR": str(cache)}
    answers = []
    for _ in range(2):  # two processes, as two Snakefile parses
        proc = subprocess.run([sys.executable, "-c", LOAD_DEMO], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers.append(proc.stdout.strip())
    assert answers == ["torch imported: True", "torch imported: False"]
    assert len(list((cache / "checkpoint-checks").glob("*.json"))) == 2  # the demo's two checkpoints


def test_a_changed_checkpoint_is_checked_again_and_a_refusal_is_not_cached(ckpts, monkeypatch):
    tmp, _ = ckpts
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp / "cache"))
    good = tmp / "good.pt"
    data = good.read_bytes()
    load(one_model("good.pt"), base=tmp)
    assert len(list((tmp / "cache" / "checkpoint-checks").glob("*.json"))) == 1
    good.write_bytes(data[: len(data) // 2])  # new size and mtime
    assert "is truncated or damaged" in refusal(one_model("good.pt"), tmp)
    good.write_bytes(data)  # fixed: passes at once
    load(one_model("good.pt"), base=tmp)
    # Same size, mtime set back (as cp -p or rsync -t would): the new ctime tells.
    before = good.stat()
    good.write_bytes(data[:-64] + bytes(64))  # the zip directory's end record blanked
    os.utime(good, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert good.stat().st_size == before.st_size and good.stat().st_mtime_ns == before.st_mtime_ns
    assert "is truncated or damaged" in refusal(one_model("good.pt"), tmp)


def test_a_pass_with_trust_does_not_pass_the_file_without_it(ckpts, monkeypatch):
    tmp, marker = ckpts
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp / "cache"))
    load(one_model("pwn.pt", trust_checkpoint=True), base=tmp)  # its zip structure only
    assert "is not a weights-only state_dict" in refusal(one_model("pwn.pt"), tmp)
    assert not marker.exists()


def test_a_cache_folder_that_cannot_be_written_means_no_caching(ckpts, monkeypatch):
    tmp, _ = ckpts
    (tmp / "a-file").write_text("")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp / "a-file" / "cache"))  # no folder can be made there
    loads = []
    monkeypatch.setattr(sources, "_weights_only", lambda *a, **k: loads.append(a[0]))
    for _ in range(2):
        load(one_model("good.pt"), base=tmp)
    assert loads == [tmp / "good.pt"] * 2 and (tmp / "a-file").read_text() == ""  # checked each time


def test_cache_dir_follows_kiln_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "k"
    monkeypatch.setenv("KILN_CACHE_DIR", "")
    assert cache_dir() == tmp_path / "x" / "kiln"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kiln"


@pytest.mark.parametrize("message, detail", [
    ("Weights only load failed.\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\n"
     "Check the documentation", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
    ("\tWeightsUnpickler error: Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default. "
     "Please use `torch.serialization.add_safe_globals([argparse.Namespace])`",
     "Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default"),
    ("unsupported global: builtins.eval", "unsupported global: builtins.eval"),  # a wording yet to come
    ("Unsupported operand 149", ""),
])
def test_refused_global_is_found_whatever_torch_wording(message, detail):
    assert sources.refused_global(message) == detail


def test_pickled_globals_are_read_without_unpickling(ckpts):
    tmp, marker = ckpts
    assert sources.pickled_globals(tmp / "pwn.pt") == ["posix.system"]
    assert sources.pickled_globals(tmp / "good.pt") == []
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Factories: trusted places, found without importing


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """``nets/evilnets/det.py`` (and its package) leave a marker when imported; a state_dict beside."""
    pkg = tmp_path / "nets" / "evilnets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MARKED)
    (pkg / "det.py").write_text(FACTORIES)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    monkeypatch.setattr(sys, "path", list(sys.path))  # run-time imports put the trusted folder on it
    yield tmp_path, pkg
    for name in [n for n in sys.modules if n.split(".")[0] == "evilnets"]:
        del sys.modules[name]


def imported(pkg: Path) -> list[str]:
    return sorted(p.name for p in pkg.glob("*.imported"))


def test_planning_finds_a_trusted_factory_without_importing_it(nets):
    tmp, pkg = nets
    raw = one_model("w.pt", factory="evilnets.det:build")
    raw["trusted_factories"] = {"folders": ["nets"]}
    cfg = load(raw, base=tmp)
    assert factories.locate("evilnets.det:build", (), (str(tmp / "nets"),)).file == pkg / "det.py"
    assert export.params(cfg, "m")["factory_code"] == file_fingerprint(pkg / "det.py")
    assert imported(pkg) == [] and "evilnets" not in sys.modules


def test_factory_outside_the_trusted_places_is_refused_at_load(nets, monkeypatch):
    tmp, pkg = nets
    monkeypatch.syspath_prepend(str(tmp / "nets"))  # importable, but not declared trusted
    assert refusal(one_model("w.pt", factory="evilnets.det:build"), tmp) == (
        "config: 'models.m.factory': 'evilnets.det:build' is not in a trusted place: Kiln imports factories only "
        "from the packages in 'trusted_factories.packages' (kiln.demo.models) and the modules under the folders in "
        "'trusted_factories.folders' (none); put its module there, or add its package or folder to "
        "'trusted_factories' if you trust all the code in it")
    # Declared as a trusted package (found on sys.path by its top-level name): accepted, still not imported.
    raw = one_model("w.pt", factory="evilnets.det:build")
    raw["trusted_factories"] = {"packages": ["evilnets"]}
    assert load(raw, base=tmp).models["m"].trusted_packages == ("evilnets",)
    assert export.params(load(raw, base=tmp), "m")["factory_code"] is not None
    assert imported(pkg) == [] and "evilnets" not in sys.modules


def test_kiln_check_refuses_os_system_in_one_line(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    cfgfile = write_config(tmp_path / "bad.yaml", one_model("w.pt", factory="os:system", factory_args={"command": "id"}))
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "check", str(cfgfile)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "kiln: config: 'models.m.factory': 'os:system' is not in a trusted place: Kiln imports factories only from "
        "the packages in 'trusted_factories.packages' (kiln.demo.models) and the modules under the folders in "
        "'trusted_factories.folders' (none); put its module there, or add its package or folder to "
        "'trusted_factories' if you trust all the code in it"]


def test_snakemake_dry_run_does_not_import_a_trusted_factory(nets):
    tmp, pkg = nets
    raw = one_model("w.pt", factory="evilnets.det:build")
    raw["trusted_factories"] = {"folders": ["nets"]}
    cfgfile = write_config(tmp / "config.yaml", raw)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
         "--configfile", str(cfgfile), "--directory", str(tmp)],
        # The module is importable too, as the dry run that imported a factory's package had it.
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": f"{REPO}:{tmp / 'nets'}"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "export" in proc.stdout and imported(pkg) == []


def test_factory_at_run_time_must_return_a_module_and_be_defined_in_a_trusted_place(nets):
    tmp, pkg = nets
    raw = one_model("w.pt", factory="evilnets.det:not_a_model")
    raw["trusted_factories"] = {"folders": ["nets"]}
    spec = load(raw, base=tmp).models["m"]
    with pytest.raises(KilnError, match=r"^config: 'models.m.factory': 'evilnets.det:not_a_model' returned int, not a "
                                        r"torch.nn.Module: name a function that builds and returns the model$"):
        export.build_module(spec)
    assert imported(pkg) == ["__init__.py.imported", "det.py.imported"]  # run time: imported, from the trusted file
    assert isinstance(factory(replace(spec, factory="evilnets.det:build"))(), torch.nn.Conv2d)
    # `from os import system` in a trusted module does not make os.system a factory.
    with pytest.raises(KilnError, match=r"^config: 'models.m.factory': 'evilnets.det:system' is defined in 'posix', "
                                        r"which is not in a trusted place"):
        factory(replace(spec, factory="evilnets.det:system"))
