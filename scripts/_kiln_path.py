"""Make the workflow's own `kiln` package importable in every job, installed or not (e.g. under --sdm conda)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
