"""The TensorRT or TensorRT-RTX module of this host, its version, and Polygraphy bound to one of them.

One place decides which TensorRT a process drives (as Polygraphy's ``mod/trt_importer.py`` does
for Polygraphy): :func:`import_trt` finds the real module, :func:`polygraphy_trt` binds
Polygraphy to it, and :func:`polygraphy_logs` routes the log of a Polygraphy call into Python
logging so that a failure can say why.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

from kiln.backends.trt import ops as trt_ops
from kiln.errors import KilnError

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# What each flavor is called in messages; kiln/backends/trt/ops.py, below this package, holds the one table.
LABELS = trt_ops.LABELS

# Highest ONNX opset each TensorRT release's ONNX parser documents: kiln/backends/trt/ops.py holds the table
# (with its sources) for TensorRT and TensorRT-RTX, and the ops each version lacks.
PARSER_MAX_OPSET: dict[tuple[int, int], int] = trt_ops.PARSER_MAX_OPSET[trt_ops.TENSORRT]


def parse_version(text: str | None) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); '' or None -> ()."""
    return tuple(int(p) for p in re.findall(r"\d+", str(text or "")))


def major_minor(text: str | None) -> tuple[int, int] | None:
    """'10.13.0.35' -> (10, 13); None when the text holds no version."""
    v = parse_version(text)
    if not v:
        return None
    return (v[0], v[1] if len(v) > 1 else 0)


def mm_str(v: tuple[int, int] | None) -> str:
    return f"{v[0]}.{v[1]}" if v else "?"


def parser_max_opset(tensorrt_version: str | tuple[int, int]) -> int | None:
    """Highest opset the ONNX parser of this TensorRT major.minor documents (None before 8.5)."""
    return trt_ops.parser_max_opset(trt_ops.TENSORRT, tensorrt_version)


def import_trt(flavor: str) -> ModuleType | None:
    """The real ``tensorrt`` / ``tensorrt_rtx`` module of this host, or None.

    A bare ``import tensorrt`` is not proof: the ``tensorrt-stubs`` package installs only .pyi
    files under ``tensorrt/``, which Python then imports as an empty namespace package. Such a
    module has no ``Builder`` and is not TensorRT (and it breaks ModelOpt's int8/fp8
    quantization, which trusts the import: keep those stubs out of the environment).
    """
    try:
        mod = importlib.import_module(FLAVORS[flavor])
    except Exception:  # ImportError, or OSError when its shared libraries cannot be loaded
        return None
    if not (hasattr(mod, "Builder") and hasattr(mod, "__version__")):
        return None
    return mod


def trt_version(flavor: str) -> str | None:
    mod = import_trt(flavor)
    return None if mod is None else str(mod.__version__)


def polygraphy_trt(flavor: str) -> SimpleNamespace:
    """Polygraphy's TensorRT backend bound to TensorRT (``"tensorrt"``) or TensorRT-RTX.

    Polygraphy decides between ``tensorrt`` and ``tensorrt_rtx`` in ``polygraphy.config`` from
    ``POLYGRAPHY_USE_TENSORRT_RTX`` when that module is first imported, and every module of it
    that touches TensorRT keeps a lazy module object, ``trt = lazy_import_trt()``, made when that
    module is imported (``polygraphy.util`` and ``polygraphy.datatype`` among them, which other
    libraries such as ModelOpt's AutoCast import early). So setting the variable is not enough
    once Polygraphy is loaded: we also set ``polygraphy.config.USE_TENSORRT_RTX`` and re-bind
    each lazy ``trt`` that has not imported its module yet. One that already imported the other
    flavor cannot be re-bound safely (objects made from it live on): that process must not mix
    the two, which is a KilnError. Kiln builds each engine in its own job process.
    """
    rtx = flavor == "tensorrt-rtx"
    trt = import_trt(flavor)
    if trt is None:
        raise KilnError(f"{LABELS[flavor]} is not installed on this host")
    from polygraphy import config as pg_config
    from polygraphy.mod.trt_importer import lazy_import_trt

    wanted = FLAVORS[flavor]
    unloaded = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy") or module is None:
            continue
        lazy = vars(module).get("trt")
        if lazy is None or type(lazy).__name__ != "LazyModule":
            continue
        # vars() reads the instance dict directly: getattr would import the module.
        loaded = vars(lazy).get("module")
        if loaded is None:
            unloaded.append(module)
        elif loaded.__name__ != wanted:
            # Checked before anything is changed, so the process keeps working with its flavor.
            raise KilnError(
                f"Polygraphy in this process already uses {loaded.__name__}; {LABELS[flavor]} builds "
                f"must run in a process of their own (one engine job per process)"
            )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if rtx else "0"
    pg_config.USE_TENSORRT_RTX = rtx
    for module in unloaded:
        module.trt = lazy_import_trt()

    import polygraphy
    import polygraphy.backend.trt as pg
    from polygraphy.backend.trt import util as pg_util

    ns = SimpleNamespace(flavor=flavor, trt=trt, pg=pg, util=pg_util, polygraphy_version=polygraphy.__version__)
    if rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        ns.CreateConfigRTX = CreateConfigRTX
    return ns


class _ErrorList(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(level=logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        # Polygraphy prefixes its severity letter; the reason reads better without it.
        self.sink.append(re.sub(r"^\[[A-Z!]\]\s*", "", text))


@contextlib.contextmanager
def polygraphy_logs() -> Iterator[list[str]]:
    """Route Polygraphy's (and through it TensorRT's) log into Python logging while in the block.

    Yields a list that collects every ERROR-level line, so that a failed build can say why in
    its KilnError (Polygraphy itself raises only "Invalid Engine ..."). INFO lines (profiles,
    flags) land in the job's log through the "Polygraphy" logger.
    """
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    handler = _ErrorList(errors)
    pylog = logging.getLogger("Polygraphy")
    old = G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    pylog.addHandler(handler)
    try:
        yield errors
    finally:
        pylog.removeHandler(handler)
        G_LOGGER.use_python_logging_system = old
