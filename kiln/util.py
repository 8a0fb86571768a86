"""Small helpers shared by every stage: hashing, atomic writes, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stale(dst: Path, suffix: str) -> list[Path]:
    """Temporaries of `dst` left by an earlier run of the step that was killed (SIGKILL, node lost).

    Their names are mkstemp's, as made below: ``.<name>.`` + 8 random characters + `suffix`.
    """
    pattern = f".{glob_escape(dst.name)}.{'?' * 8}{glob_escape(suffix)}"
    return sorted(dst.parent.glob(pattern)) if dst.parent.is_dir() else []


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(dst: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds.

    A killed or failed step therefore never leaves a file at `dst` that looks finished. Temporaries
    of `dst` that a killed earlier run left behind are removed first: one job writes one output,
    so nothing else can be writing them.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or dst.suffix + ".tmp"
    for old in _stale(dst, suffix):
        old.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should look like any other file
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_dir(dst: str | Path) -> Iterator[Path]:
    """A scratch folder beside `dst` (``.<name>.<random>.scratch``) for a tool's intermediates, removed after.

    Beside the output rather than in /tmp: a killed job's leftovers are found and removed by the next
    run of the same step (and /tmp may be small on build nodes).
    """
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for old in _stale(dst, ".scratch"):
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".scratch"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, keys in insertion order, NaN refused (it is not JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_default, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
