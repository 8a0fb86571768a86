"""Artifacts checked against the records that describe them: an engine against engine.json, the ONNX it was
built from against the sha256 there, reference outputs against reference.json.

A record holds a file's size and sha256, and a stamp of the file as it was written (its mtime and ctime,
in nanoseconds). A file that differs in size is damaged; one whose stamp is unchanged is the file the
record describes, without reading it (nobody can set a ctime back); any other is hashed. So the check
is cheap where nothing happened, and a file truncated or rewritten with its old mtime put back
(``os.utime``) is still found: writing it moved its ctime.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import KilnError
from kiln.util import sha256


def stamp(path: str | Path) -> dict[str, int]:
    """What a record keeps of a file's stat to trust it later without hashing it."""
    st = os.stat(path)
    return {"mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def differs(path: str | Path, digest: str | None, size: int | None, stamped: dict | None = None,
            full: bool = False) -> str | None:
    """How `path` differs from a record's size, sha256 and stamp, in words; None when it matches.

    `full`: hash it even where the stamp says it is unchanged (what a stage loading the file does).
    What the record lacks is not compared.
    """
    p = Path(path)
    if not p.is_file():
        return "it does not exist"
    st = p.stat()
    if size is not None and st.st_size != size:
        return f"it is {st.st_size} bytes, the record says {size}"
    if digest is None:
        return None
    if not full and stamped and stamped == {"mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}:
        return None
    actual = sha256(p)
    if actual != digest:
        return f"its sha256 is {actual[:12]}..., the record says {digest[:12]}..."
    return None


def _rerun(target: str | Path, what: str) -> str:
    # Snakemake remakes neither a changed nor a deleted output of a finished job by itself: --forcerun does.
    return f"Run Snakemake again with --forcerun {target} to {what}"


def engine_problem(record: dict, record_path: str | Path, engine: str | Path, full: bool = False,
                   target: str | Path | None = None) -> str | None:
    """Why `engine` is not the engine its record (engine.json) describes, with the fix; None when it is.

    `target` is the record's artifact path, what --forcerun takes (`record_path` may be a local copy).
    """
    if record.get("status") != "built":
        return None
    why = differs(engine, record.get("engine_sha256"), record.get("engine_bytes"), record.get("engine_stamp"), full)
    if why is None:
        return None
    return (f"{engine} does not match its record {record_path} ({why}): it changed after it was built. "
            + _rerun(target or record_path, "rebuild it"))


def onnx_problem(record: dict, record_path: str | Path, onnx: str | Path, full: bool = False,
                 target: str | Path | None = None) -> str | None:
    """Why `onnx` is not the ONNX the engine of `record` was built from, with the fix; None when it is."""
    if not record.get("onnx_sha256"):
        return None
    why = differs(onnx, record["onnx_sha256"], record.get("onnx_bytes"), record.get("onnx_stamp"), full)
    if why is None:
        return None
    return (f"{onnx} is not the ONNX that {record_path} was built from ({why}). "
            + _rerun(target or record_path, "rebuild the engine from it"))


def reference_problem(record: dict, record_path: str | Path, outputs: str | Path, full: bool = False,
                      target: str | Path | None = None) -> str | None:
    """Why `outputs` (outputs.npz) is not what its record (reference.json) describes, with the fix."""
    fix = _rerun(target or record_path, "make the reference again (and validate its engines again)")
    if "outputs_sha256" not in record:
        return f"{record_path} records no outputs_sha256 (an older Kiln wrote it), so {outputs} cannot be checked. {fix}"
    why = differs(outputs, record["outputs_sha256"], record.get("outputs_bytes"), record.get("outputs_stamp"), full)
    if why is None:
        return None
    return f"{outputs} does not match its record {record_path} ({why}): it changed after it was made. {fix}"


def check(problem: str | None) -> None:
    """Raise a problem found above as the one error of the stage that was to use the file."""
    if problem:
        raise KilnError(problem)
