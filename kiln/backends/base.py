"""What every backend's runner offers to validation."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """A loaded engine: named inputs in, named outputs out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch synchronously and return host arrays."""
        ...
