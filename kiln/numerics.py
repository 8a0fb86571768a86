"""CPU-independent float paths for torch, where a stage's bytes must not depend on the CPU (export).

The TorchScript exporter folds constants (BatchNorm into Conv, positional embeddings, anchor grids)
by running torch's CPU kernels, so the folded values are written into the ONNX. Those kernels
dispatch on the CPU they run on:

* ATen's vectorized kernels by instruction set (``ATEN_CPU_CAPABILITY``: default, avx2, avx512);
  measured here, RT-DETR's folded constants differ between avx2 and avx512/default;
* Intel MKL (BLAS) by instruction set and vendor: on an AMD CPU it takes other code paths than on
  an Intel one. Measured here with ``MKL_ENABLE_INSTRUCTIONS=AVX2``, YOLO's export changed too.
  ``MKL_CBWR=COMPATIBLE`` is MKL's own switch for results that are bitwise equal on every x86 CPU.

:func:`cpu_independent_torch` sets both (and one intra-op thread, so reductions keep one order)
for the block it guards. They take effect only if no torch kernel has run in the process yet: the
stage's script imports torch inside it. :func:`pinned` says whether they did.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


@contextlib.contextmanager
def cpu_independent_torch() -> Iterator[bool]:
    """Run the block on torch's CPU-independent paths; yields whether they are in effect (see module doc)."""
    saved = {k: os.environ.get(k) for k in PINNED_ENV}
    os.environ.update(PINNED_ENV)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield pinned()
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():  # child processes of this one (and tests) get the caller's settings back
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pinned() -> bool:
    """True when ATen runs its default (non-vectorized) kernels in this process."""
    import torch

    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
