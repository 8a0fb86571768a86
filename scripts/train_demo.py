#!/usr/bin/env python
"""Train the bundled demo detectors (CPU, ~20 min on 2 cores); see kiln.demo.train."""

from __future__ import annotations

import sys
from pathlib import Path

# Allow running from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.demo.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
