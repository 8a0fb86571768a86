"""Entry points' shared behaviour: logging to the rule's log, and user errors without tracebacks."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from kiln.errors import KilnError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | None = None, tag: str = "") -> None:
    """Log to the rule's log file and, for progress, to stderr (Snakemake shows it)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    fmt = FORMAT if not tag else f"%(asctime)s [{tag}] %(levelname)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", handlers=handlers, force=True)
    # Third-party libraries log a lot at INFO; keep their warnings.
    for noisy in ("modelopt", "onnxruntime", "onnx_graphsurgeon", "polygraphy", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def script(smk) -> Iterator:
    """Run a Snakemake `script:` body: config loaded, logging set up, KilnError printed as one line."""
    from kiln import config as kcfg

    tag = f"{smk.rule} " + " ".join(f"{k}={v}" for k, v in smk.wildcards.items())
    setup_logging(smk.log[0] if smk.log else None, tag.strip())
    try:
        cfg = kcfg.load(smk.config, check_paths=False)
        yield cfg
    except KilnError as err:
        logging.getLogger("kiln").error("%s", err)
        print(f"kiln: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        # A bug or a tool's own failure: its traceback goes to the rule's log too, which is otherwise empty.
        logging.getLogger("kiln").exception("unexpected error in rule %s", smk.rule)
        sys.exit(1)
