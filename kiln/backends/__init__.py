"""Backend registry: each backend is one module with the same small surface.

A backend module defines:
  NAME, ENGINE_SUFFIX
  is_available() -> bool                    the backend's Python package imports here
  version() -> str | None
  check_device(device) -> list[str]         config-time problems (precision, opset), as fixes
  check_build_host(device) -> str | None    why this host cannot build the device's engines, or None
  check_host(device) -> str | None          why this host cannot run them (validate), or None
  source_precision(precision, device) -> str  which precision-variant ONNX the engine is built from
  build_params(device, validation_batch_size) -> dict  device settings that change an engine (tracked)
  build(onnx_path, engine_path, device, precision, threads) -> dict   engine metadata
  load_runner(engine_path, device, threads) -> Runner                 see kiln.backends.base

Adding a backend adds a module and a line in BACKENDS; the DAG does not change.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kiln.errors import KilnError

BACKENDS = {
    "onnxruntime": "kiln.backends.onnxruntime",
    "tensorrt": "kiln.backends.tensorrt",
    "tensorrt-rtx": "kiln.backends.tensorrt_rtx",
}


def names() -> list[str]:
    return list(BACKENDS)


def get(name: str) -> ModuleType:
    """The backend module registered under `name`."""
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise KilnError(f"unknown backend '{name}': use one of {', '.join(BACKENDS)}") from None
