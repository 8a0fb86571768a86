"""ModelOpt's and ONNX Runtime's logging during a conversion: warnings kept and forwarded, noise dropped."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# Known harmless ModelOpt messages on a CPU-only host, kept out of the log (counted in the record).
_NOISE = (
    re.compile(r"NVML Shared Library Not Found"),  # GPU count probe, logged at ERROR level on CPU
    re.compile(r"Did not find\s+in value info map"),  # empty optional input name (e.g. Resize roi)
    re.compile(r"Shared constants were detected and duplicated"),
    # Our own second AutoCast pass over the Q/DQ model; fp16 Q/DQ scales need opset 19, as intended.
    re.compile(r"Found QuantizeLinear/DequantizeLinear nodes\. Updating minimum opset"),
)
_PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm bars from ORT's calibrator
_MODELOPT_LINE = re.compile(r"\[modelopt\]\[onnx\] - [A-Z]+ - |^\S+ - modelopt\.onnx")
_MAX_FORWARDED = 25


class Capture:
    """Routes ModelOpt's and ORT's chatter: warnings go to ``log`` once each, the rest is dropped.

    ModelOpt logs INFO to stdout by default (dozens of lines per model, hundreds with AutoCast's
    per-node range messages) and ORT's calibrator prints progress bars. Warnings are kept: forwarded
    (deduplicated, truncated, at most ``_MAX_FORWARDED``) and listed in the record. A short tail of
    everything is kept to explain a failure.
    """

    def __init__(self, log: Callable[[str], Any]):
        self.log = log
        self.warnings: list[str] = []
        self.suppressed = 0
        self.tail: deque[str] = deque(maxlen=30)
        self._seen: set[str] = set()

    def warning(self, text: str) -> None:
        text = " ".join(text.split())[:400]
        self.tail.append(text)
        if any(p.search(text) for p in _NOISE):
            self.suppressed += 1
            return
        if text in self._seen:
            return
        self._seen.add(text)
        self.warnings.append(text)

    def _forward(self, start: int) -> None:
        # Called after stdout/stderr are restored: ``log`` may well be print(), and printing into
        # our own sink would feed the warning back into itself.
        for i, text in enumerate(self.warnings[start:], start):
            if i < _MAX_FORWARDED:
                self.log(f"  modelopt: {text}")
            elif i == _MAX_FORWARDED:
                self.log(f"  modelopt: {len(self.warnings) - i} more warnings, listed in the record")
                break

    def line(self, text: str) -> None:
        text = text.strip()
        if not text or _PROGRESS.search(text) or _MODELOPT_LINE.search(text):
            return  # progress bars; ModelOpt records reach us through the handler already
        if re.search(r"\b\w*(Warning|Error)\b|\bWARN", text):
            self.warning(text)
        else:
            self.tail.append(text[:400])

    def context(self) -> str:
        return ("\n  last ModelOpt output:\n    " + "\n    ".join(self.tail)) if self.tail else ""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Capture for the duration of one ModelOpt call; restores logger state afterwards."""
        names = [n for n in list(logging.root.manager.loggerDict) if n == "modelopt" or n.startswith("modelopt.")]
        names = sorted(set(names) | {"modelopt", "modelopt.onnx", "modelopt.onnx.autocast"})
        saved = {}
        for n in names:
            lg = logging.getLogger(n)
            saved[n] = (lg.handlers[:], lg.level, lg.propagate)
            if n != "modelopt":
                # Handlers made at import time write to the real stdout; everything should flow up
                # to "modelopt" instead, where our handler is and propagation to the root stops.
                for h in lg.handlers[:]:
                    lg.removeHandler(h)
                lg.setLevel(logging.WARNING)
                lg.propagate = True
        top = logging.getLogger("modelopt")
        handler = _Handler(self)
        top.addHandler(handler)
        top.propagate = False  # the app's root handlers would print every record a second time
        top.setLevel(logging.WARNING)
        # quantize() re-runs ModelOpt's configure_logging(), which re-adds a stdout handler and
        # ORT's calibrator print()s; both land in these sinks (bound to sys.stdout at call time).
        out, err = _Sink(self), _Sink(self)
        start = len(self.warnings)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            out.flush_pending()
            err.flush_pending()
            top.removeHandler(handler)
            for n, (handlers, level, propagate) in saved.items():
                lg = logging.getLogger(n)
                for h in lg.handlers[:]:
                    lg.removeHandler(h)
                for h in handlers:
                    lg.addHandler(h)
                lg.setLevel(level)
                lg.propagate = propagate
            self._forward(start)


class _Handler(logging.Handler):
    def __init__(self, capture: Capture):
        super().__init__(level=logging.WARNING)
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.capture.warning(f"{record.levelname}: {record.getMessage()}")
        except Exception:  # noqa: BLE001  logging must never break the conversion
            self.handleError(record)


class _Sink(io.TextIOBase):
    """A write-only text stream that hands complete lines to a Capture."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = re.split(r"[\r\n]", self._buf)
        for line in lines:
            self.capture.line(line)
        return len(s)

    def flush_pending(self) -> None:
        if self._buf:
            self.capture.line(self._buf)
            self._buf = ""
