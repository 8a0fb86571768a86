"""Entry points' shared behaviour: logging to the rule's log, and user errors without tracebacks.

Two kinds of failure end a job with one line, in the rule's log and on stderr (Snakemake shows it):
a KilnError (a mistake the user can fix, named with its fix), and a full disk or quota (OSError
ENOSPC / EDQUOT, however deep a tool wrapped it), named with the path and the free space there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import NoReturn

from kiln.errors import KilnError
from kiln.util import disk_error, disk_full_message

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RuleLog(logging.FileHandler):
    """The rule's log file. On a full disk it cannot be written either: that is no reason for logging's
    own traceback on stderr, which carries the one line that matters."""

    def handleError(self, record: logging.LogRecord) -> None:
        if disk_error(sys.exc_info()[1]) is None:
            super().handleError(record)


def setup_logging(log_file: str | None = None, tag: str = "") -> None:
    """Log to the rule's log file and, for progress, to stderr (Snakemake shows it)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(_RuleLog(log_file, mode="w"))
    fmt = FORMAT if not tag else f"%(asctime)s [{tag}] %(levelname)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", handlers=handlers, force=True)
    # Third-party libraries log a lot at INFO; keep their warnings.
    for noisy in ("modelopt", "onnxruntime", "onnx_graphsurgeon", "polygraphy", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> NoReturn:
    """End the job with one line: in the rule's log and on stderr, no traceback."""
    logging.getLogger("kiln").error("%s", message)
    print(f"kiln: {message}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def script(smk) -> Iterator:
    """Run a Snakemake `script:` body: config loaded, logging set up, KilnError and a full disk printed as one line."""
    from kiln import config as kcfg

    tag = f"{smk.rule} " + " ".join(f"{k}={v}" for k, v in smk.wildcards.items())
    setup_logging(smk.log[0] if smk.log else None, tag.strip())
    try:
        cfg = kcfg.load(smk.config, check_paths=False)
        yield cfg
    except KilnError as err:
        _fail(str(err))
    except Exception as err:
        disk = disk_error(err)
        if disk is None:
            # A bug or a tool's own failure: its traceback goes to the rule's log too, which is otherwise empty.
            logging.getLogger("kiln").exception("unexpected error in rule %s", smk.rule)
            sys.exit(1)
        # An OSError raised by a write() names no file: the job's first output is where it was writing.
        _fail(disk_full_message(disk, near=smk.output[0] if smk.output else None))
