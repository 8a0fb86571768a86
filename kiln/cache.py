"""Kiln's cache folder: answers that are slow to find and cheap to key, kept between processes.

``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``. Every Snakefile parse
(each cluster job re-parses it) and every ``kiln check`` loads the config again, so what the load
would otherwise recompute each time is kept here. A cache only saves time: a folder that cannot be
read or written means nothing is cached, never an error. Imports nothing of Kiln, so any floor can
use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder Kiln caches in (it may not exist yet)."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln"


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``; False if it could not be written.

    A reader (another job parsing the Snakefile at the same moment) sees the old file or the new
    one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder: no caching
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    return True
