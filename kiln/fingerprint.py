"""Fingerprints of the kiln code a job runs, so a code edit reruns exactly the jobs it can affect.

Snakemake watches a rule's script file but not the package modules the script
imports. Each job therefore carries, as a tracked param, the hash of its
stage module and every kiln module that one imports, found statically, plus
the modules a registry imports by name for that job: its device's backend, its
model's source adapter, its dataset's generator (kiln.workflow.Plan.code).
Registries import by name so that a stage's closure holds none of them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (PACKAGE_DIR.parent / rel.with_suffix(".py"), PACKAGE_DIR.parent / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _kiln_imports(path: Path) -> frozenset[str]:
    """kiln modules imported anywhere in `path` (including imports inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kiln"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kiln":
            found.add(node.module)
            # `from kiln import paths` imports the module kiln.paths.
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return frozenset(found)


@functools.cache
def closure(module: str) -> tuple[str, ...]:
    """`module` and every kiln module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_kiln_imports(path))
    return tuple(sorted(seen))


@functools.cache
def code_fingerprint(*modules: str) -> str:
    """sha256 over the sources of the modules' kiln import closures (first 16 hex digits).

    Backends are imported by name through the registry, so rules that use one pass
    its module here explicitly: editing one backend reruns only its devices' jobs.
    """
    h = hashlib.sha256()
    for name in sorted(set().union(*(closure(m) for m in modules))):
        h.update(name.encode() + b"\0" + _module_file(name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str | None:
    """sha256 (16 hex digits) of a file, e.g. a factory's module found by kiln.sources.factories; None if none."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
