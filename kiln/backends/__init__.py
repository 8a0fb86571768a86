"""Backend registry: each backend is a :class:`kiln.backends.base.Backend`, registered under its name.

Kiln's own backends are listed in :data:`BACKENDS`; another package adds one through the entry-point
group ``kiln.backends`` (``name = "package.module:Class"``), with no change to Kiln: adding a
backend adds a module and a registry line, and the DAG does not change. A backend module is
imported only when a config names it, so a stage's code fingerprint covers the backend of its
device and no other (kiln.fingerprint).
"""

from __future__ import annotations

import functools
import importlib
from importlib import metadata

from kiln.backends.base import Backend, Runner
from kiln.errors import KilnError

__all__ = ["BACKENDS", "Backend", "Runner", "engine_params", "get", "module_of", "names"]

BACKENDS = {
    "onnxruntime": "kiln.backends.onnxruntime:OnnxRuntime",
    "tensorrt": "kiln.backends.tensorrt:TensorRT",
    "tensorrt-rtx": "kiln.backends.tensorrt_rtx:TensorRTRTX",
}
ENTRY_POINT_GROUP = "kiln.backends"


@functools.cache
def registry() -> dict[str, str]:
    """name -> "module:Class" of every backend: Kiln's own, then those other packages register."""
    found = dict(BACKENDS)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def names() -> list[str]:
    return list(registry())


def module_of(name: str) -> str:
    """The module that defines backend `name` (for code fingerprints)."""
    return registry()[name].partition(":")[0]


@functools.cache
def get(name: str) -> Backend:
    """The backend registered under `name`."""
    if name not in registry():
        raise KilnError(f"unknown backend '{name}': use one of {', '.join(registry())}")
    module, _, cls = registry()[name].partition(":")
    try:
        obj = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise KilnError(f"backend '{name}' is registered as '{registry()[name]}', which cannot be imported "
                        f"({type(err).__name__}: {err}): fix or uninstall the package that registers it") from None
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise KilnError(f"backend '{name}' ('{registry()[name]}') is not a kiln.backends.base.Backend subclass")
    try:
        backend = obj()
    except TypeError as err:  # abstract methods left unimplemented
        raise KilnError(f"backend '{name}' ('{registry()[name]}') does not implement the backend contract: "
                        f"{err}") from None
    if backend.name != name:
        raise KilnError(f"backend '{name}' ('{registry()[name]}') calls itself '{backend.name}': register it "
                        f"under its own name")
    return backend


def engine_params(device, validation_batch_size: int) -> dict:
    """What shapes a device's engines, as plain values Snakemake tracks (build and diagnose rules)."""
    backend = get(device.backend)
    return {
        "backend": device.backend,
        # Upgrading the backend on a host rebuilds that host's engines.
        "backend_version": backend.version(),
        "options": backend.build_params(device, validation_batch_size),
    }
