"""Small helpers shared by every stage: hashing, atomic writes, JSON, full disks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
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


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def _stale(dst: Path, suffix: str) -> list[Path]:
    """Temporaries of `dst` that another run of the step left: ``.<name>.`` + mkstemp's 8 random characters +
    `suffix`, as made below. Whether their writer is gone is for :func:`_claim` to say."""
    pattern = f".{glob_escape(dst.name)}.{'?' * 8}{glob_escape(suffix)}"
    return sorted(dst.parent.glob(pattern)) if dst.parent.is_dir() else []


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _lock(path: Path, blocking: bool = True, create: bool = False) -> int | None:
    """An exclusive flock on `path` (its fd, to keep open while the lock is to hold); None if another process
    holds it (or the file is gone). flock reaches other hosts on NFS (as a POSIX lock on Linux)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666 & ~_UMASK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _sweep(dst: Path, suffix: str, lock_name: str | None = None) -> None:
    """Remove the temporaries of `dst` whose writer is gone: a killed job (SIGKILL, a lost node) leaves them.

    A live writer holds an flock on its temporary (or on `lock_name` inside a scratch folder), so a copy of
    the same job still running elsewhere (an orphan of a killed Snakemake) keeps its files.
    """
    import time

    for old in _stale(dst, suffix):
        if lock_name is None:
            fd = _lock(old, blocking=False) if old.is_file() else None
        elif (old / lock_name).is_file():
            fd = _lock(old / lock_name, blocking=False)
        else:  # made, then killed before its lock file: stale unless just made
            fd = None if time.time() - old.stat().st_mtime < 600 else os.open(os.devnull, os.O_RDONLY)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dst: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds.

    A killed or failed step therefore never leaves a file at `dst` that looks finished. The data is
    fsynced before the rename. Temporaries of `dst` that a killed earlier run left behind are removed
    first; this one is flocked while it is written, so a rerun leaves it alone while its writer lives.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or dst.suffix + ".tmp"
    _sweep(dst, suffix)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=suffix)
    tmp = Path(name)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # new and private: never blocks
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should look like any other file
        yield tmp
        with open(tmp, "rb") as f:  # the file at the name: a writer may have replaced the inode
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        os.close(fd)


SCRATCH_LOCK = ".kiln-lock"


@contextlib.contextmanager
def scratch_dir(dst: str | Path) -> Iterator[Path]:
    """A scratch folder beside `dst` (``.<name>.<random>.scratch``) for a tool's intermediates, removed after.

    Beside the output rather than in /tmp: a killed job's leftovers are found and removed by the next
    run of the same step (and /tmp may be small on build nodes). A lock file inside marks it as in use.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dst, ".scratch", lock_name=SCRATCH_LOCK)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".scratch"))
    fd = _lock(work / SCRATCH_LOCK, create=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            os.close(fd)


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


# --------------------------------------------------------------------------------------------------
# A full disk: no tool's failure, and one line naming where and how much is free

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What a tool that wraps the OSError in its own type (or a child process) keeps of it: its text.
_DISK_TEXT = re.compile(
    rf"\[Errno (?P<errno>{errno.ENOSPC}|{errno.EDQUOT})\][^:\n]*(?:: '(?P<path>[^'\n]*)')?"
    r"|(?P<nospace>no space left on device)|(?P<quota>disk quota exceeded)",
    re.IGNORECASE,
)


def disk_error(err: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `err` (itself, its cause or context, or named in its text), or None.

    Stages that catch a tool's failure ask this first: a full disk is the host's problem, not the tool's.
    """
    seen: set[int] = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    m = _DISK_TEXT.search(str(err)) if err is not None else None
    if m is None:
        return None
    code = int(m["errno"]) if m["errno"] else errno.EDQUOT if m["quota"] else errno.ENOSPC
    return OSError(code, os.strerror(code), m["path"]) if m["path"] else OSError(code, os.strerror(code))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def disk_full_message(err: OSError, near: str | Path | None = None) -> str:
    """One line for a full disk or quota: the path written (`near` when the error names none), the free space
    on its filesystem (shutil.disk_usage), and the fix."""
    where = Path(os.fsdecode(err.filename)) if err.filename else Path(near) if near else Path.cwd()
    probe = where
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        free = f"{_size(usage.free)} free of {_size(usage.total)} on its filesystem"
    except OSError:
        free = "free space unknown"
    if err.errno == errno.EDQUOT:
        return (f"disk quota exceeded writing '{where}' ({free}, but your quota there is used up): delete some of "
                f"your files there or ask for a larger quota, then rerun")
    return (f"no space left on device writing '{where}' ({free}): free some space there, or point 'results' at "
            f"a larger disk, then rerun")
