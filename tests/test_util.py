"""Atomic writes and scratch folders (kiln/util.py): what a failed or killed step leaves behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kiln.util import SCRATCH_LOCK, atomic_path, scratch_dir


def test_atomic_path_writes_only_on_success(tmp_path):
    dst = tmp_path / "model.engine"
    with atomic_path(dst) as tmp:
        assert tmp.parent == dst.parent and tmp.name.startswith(".model.engine.")
        tmp.write_bytes(b"plan")
    assert dst.read_bytes() == b"plan"
    with pytest.raises(RuntimeError), atomic_path(dst) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("builder failed")
    assert dst.read_bytes() == b"plan"  # the older one stays as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine"]


def test_atomic_path_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def killed(dst: Path, suffix: str | None = None) -> Path:
    """What SIGKILL during an atomic write of `dst` leaves: its temporary, under the name atomic_path gave it."""
    with pytest.raises(KeyboardInterrupt), atomic_path(dst, suffix) as tmp:
        name = tmp.name
        raise KeyboardInterrupt
    left = dst.parent / name
    left.write_bytes(b"half")
    return left


def test_a_killed_runs_temporaries_are_removed_by_the_next_write(tmp_path):
    engine = killed(tmp_path / "model.engine")
    npz = killed(tmp_path / "outputs.npz", suffix=".tmp.npz")
    record = killed(tmp_path / "engine.json")
    other = killed(tmp_path / "model.engine.json")  # a name that starts with the engine's
    assert engine.name.startswith(".model.engine.") and npz.name.endswith(".tmp.npz")
    with atomic_path(tmp_path / "model.engine") as tmp:
        tmp.write_bytes(b"plan")
    assert not engine.exists()
    assert npz.exists() and record.exists() and other.exists()  # not this output's: left for their own steps
    with atomic_path(tmp_path / "outputs.npz", suffix=".tmp.npz") as tmp:
        tmp.write_bytes(b"npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([record.name, other.name, "model.engine", "outputs.npz"])


def test_names_with_glob_characters_match_only_themselves(tmp_path):
    bracket = killed(tmp_path / "a[1].onnx")
    plain = killed(tmp_path / "a1.onnx")
    with atomic_path(tmp_path / "a[1].onnx") as tmp:
        tmp.write_bytes(b"x")
    assert not bracket.exists() and plain.exists()


def test_scratch_dir_is_removed_after_and_a_killed_ones_before(tmp_path):
    dst = tmp_path / "int8.onnx"
    with pytest.raises(KeyboardInterrupt), scratch_dir(dst) as work:
        stale = work
        raise KeyboardInterrupt
    (stale / "sub").mkdir(parents=True)  # as if the job had been killed while ModelOpt wrote in it:
    (stale / SCRATCH_LOCK).touch()  # its lock file stays, no longer locked by anyone
    (stale / "sub" / "model_opset19.onnx").write_bytes(b"x")
    with scratch_dir(dst) as work:
        assert not stale.exists()
        assert work.parent == tmp_path and work.is_dir()
        (work / "model.onnx").write_bytes(b"y")
    assert not work.exists()
    with pytest.raises(ValueError), scratch_dir(dst) as work:
        raise ValueError("ModelOpt failed")
    assert list(tmp_path.iterdir()) == []


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    """Another copy of the same job still writing (an orphan of a killed Snakemake) holds its flock: kept."""
    dst = tmp_path / "model.engine"
    with atomic_path(dst) as live:
        live.write_bytes(b"being written")
        with atomic_path(dst) as tmp:
            tmp.write_bytes(b"plan")
        assert live.read_bytes() == b"being written"
    assert dst.read_bytes() == b"being written"  # the last rename wins, as without any sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine"]
    with scratch_dir(dst) as live:
        (live / "model_opset19.onnx").write_bytes(b"x")
        with scratch_dir(dst) as work:
            assert work != live
        assert (live / "model_opset19.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine"]
