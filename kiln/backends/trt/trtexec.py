"""trtexec (TensorRT) or tensorrt_rtx (TensorRT-RTX) on the engine Kiln timed, with the timing pinned.

Where the tool is on PATH, validation runs it on the same engine file at each timed batch size
and records its numbers beside Kiln's own. TensorRT versions differ in trtexec's defaults for data
transfers, spin-wait and CUDA graphs, so the command sets every timing choice Kiln made itself:
``--warmUp``, ``--iterations``, ``--duration``, ``--useSpinWait``, ``--useCudaGraph`` (or
TensorRT-RTX's ``--rtxCudaGraphStrategy=wholeGraph`` where its help lists it), and
``--noDataTransfers`` when Kiln measured without copies (it measures with them by default, which
is trtexec 10's default; there is no flag to force them on). The settings trtexec prints in its
"Inference Options" are parsed back and compared with what Kiln asked for, so a tool that
ignored a flag or defaulted otherwise is reported, not silently compared.

Parsing follows trtexec's documented output: the "=== Performance summary ===" block with
Throughput (qps), Latency, Enqueue Time, H2D Latency, GPU Compute Time and D2H Latency as
``min = ... ms, max = ... ms, mean = ... ms, median = ... ms, percentile(P%) = ... ms``, then
Total Host Walltime and Total GPU Compute Time.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

EXECUTABLES = {"tensorrt": "trtexec", "tensorrt-rtx": "tensorrt_rtx"}

# Summary metric label -> Kiln's phase name (as in kiln.latency's phases).
METRICS = {
    "Latency": "latency",
    "Host Latency": "latency",  # TensorRT 7's label
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "compute",
    "D2H Latency": "d2h",
}
# "Inference Options" lines -> the timing settings they report.
OPTIONS = {"Data transfers": "data_transfers", "Spin-wait": "spin_wait", "CUDA Graph": "cuda_graph"}

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_STAT = re.compile(rf"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*({_NUM})\s*ms")


@dataclass(frozen=True)
class Settings:
    """How a run is timed; Kiln's own GPU measurement uses the same values."""

    warmup_ms: float
    iterations: int
    duration_s: float
    spin_wait: bool = True
    data_transfers: bool = True
    cuda_graph: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def find(flavor: str) -> str | None:
    """Path of trtexec (TensorRT) or tensorrt_rtx (TensorRT-RTX) on PATH, or None."""
    return shutil.which(EXECUTABLES[flavor])


def shape_arg(shapes: dict[str, Sequence[int]]) -> str:
    """trtexec's --shapes value: name:AxBxC,name2:DxE."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def command(exe: str, engine: str, shapes: dict[str, Sequence[int]], settings: Settings, *,
            flavor: str = "tensorrt", profile: int = 0, help_text: str = "") -> list[str]:
    """The command that times `engine` at `shapes` with every timing choice explicit."""
    cmd = [exe, f"--loadEngine={engine}"]
    if shapes:
        cmd.append(f"--shapes={shape_arg(shapes)}")
    if profile:
        cmd.append(f"--useProfile={int(profile)}")
    cmd += [
        f"--warmUp={int(round(settings.warmup_ms))}",
        f"--iterations={int(settings.iterations)}",
        # Whole seconds: older trtexec parses --duration as an integer.
        f"--duration={max(1, math.ceil(settings.duration_s))}",
    ]
    if settings.spin_wait:
        cmd.append("--useSpinWait")
    if not settings.data_transfers:
        cmd.append("--noDataTransfers")
    if settings.cuda_graph:
        if flavor == "tensorrt-rtx" and "--rtxCudaGraphStrategy" in help_text:
            cmd.append("--rtxCudaGraphStrategy=wholeGraph")
        else:
            cmd.append("--useCudaGraph")
    return cmd


def _stats(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in _STAT.finditer(text):
        key, pct, value = m.group(1), m.group(2), float(m.group(3))
        if pct is not None:
            p = float(pct)
            out[f"p{int(p) if p.is_integer() else p}_ms"] = value
        else:
            out[f"{key}_ms"] = value
    return out


def parse(text: str) -> dict:
    """trtexec's output -> {"version", "passed", "settings", "throughput_qps", <metric>: stats, "warnings", ...}.

    Lines may carry trtexec's "[date-time] [I] " prefix. Metrics missing from the output are
    absent from the result; nothing is invented.
    """
    result: dict = {"settings": {}, "warnings": []}
    m = re.search(r"\[TensorRT(?:-RTX)? v(\d+)\]", text)
    if m:
        result["version"] = m.group(1)
    if re.search(r"^&&&& PASSED", text, re.M):
        result["passed"] = True
    elif re.search(r"^&&&& FAILED", text, re.M):
        result["passed"] = False
    in_summary = False
    for raw in text.splitlines():
        line = re.sub(r"^\s*(?:\[[^\]]*\]\s*)*", "", raw).strip()  # drop "[date] [I] " prefixes
        for label, key in OPTIONS.items():
            om = re.fullmatch(rf"{re.escape(label)}:\s*(Enabled|Disabled)", line)
            if om:
                result["settings"][key] = om.group(1) == "Enabled"
        im = re.fullmatch(r"Iterations:\s*(\d+)", line)
        if im:
            result["settings"]["iterations"] = int(im.group(1))
        dm = re.fullmatch(rf"Duration:\s*({_NUM})s\s*\(\+\s*({_NUM})ms warm up\)", line)
        if dm:
            result["settings"]["duration_s"] = float(dm.group(1))
            result["settings"]["warmup_ms"] = float(dm.group(2))
        if "=== Performance summary ===" in line:
            in_summary = True
            continue
        if in_summary and line.startswith("==="):
            in_summary = False
        if not in_summary:
            continue
        tm = re.match(rf"Throughput:\s*({_NUM})\s*qps", line)
        if tm:
            result["throughput_qps"] = float(tm.group(1))
            continue
        label, _, rest = line.partition(":")
        if label in METRICS and "min =" in rest:
            result[METRICS[label]] = _stats(rest)
            continue
        wm = re.match(rf"Total (Host Walltime|GPU Compute Time):\s*({_NUM})\s*s", line)
        if wm:
            result["total_host_walltime_s" if wm.group(1) == "Host Walltime" else "total_gpu_compute_s"] = float(
                wm.group(2))
            continue
        if raw.find("[W]") >= 0 and line:
            result["warnings"].append(line.lstrip("* ").strip())
    return result


def compare_settings(asked: Settings, reported: dict) -> list[str]:
    """Timing settings trtexec reports differently from what Kiln asked for (empty: they match)."""
    out = []
    for key in ("data_transfers", "spin_wait", "cuda_graph"):
        if key in reported and reported[key] != getattr(asked, key):
            out.append(f"{key.replace('_', ' ')}: asked {'on' if getattr(asked, key) else 'off'}, "
                       f"trtexec ran it {'on' if reported[key] else 'off'}")
    if "iterations" in reported and reported["iterations"] != asked.iterations:
        out.append(f"iterations: asked {asked.iterations}, trtexec reports {reported['iterations']}")
    return out


@functools.cache
def help_text(exe: str) -> str:
    try:
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout + proc.stderr


def run(exe: str, engine: str, shapes: dict[str, Sequence[int]], settings: Settings, *, flavor: str = "tensorrt",
        profile: int = 0, timeout: float = 600, helptext: str | None = None) -> dict:
    """Run the tool once and return the command, its settings check and its parsed summary."""
    helptext = help_text(exe) if helptext is None and flavor == "tensorrt-rtx" else (helptext or "")
    cmd = command(exe, engine, shapes, settings, flavor=flavor, profile=profile, help_text=helptext)
    record: dict = {"command": " ".join(cmd), "asked": settings.as_dict()}
    log.info("trtexec: %s", record["command"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record.update(status="failed", reason=f"timed out after {timeout:.0f} s")
        return record
    except OSError as err:
        record.update(status="failed", reason=str(err))
        return record
    text = proc.stdout + proc.stderr
    parsed = parse(text)
    record.update(returncode=proc.returncode, **parsed)
    if proc.returncode != 0 or "compute" not in parsed:
        tail = " | ".join(text.strip().splitlines()[-5:])
        record.update(status="failed", reason=f"{EXECUTABLES[flavor]} exited {proc.returncode}: {tail}"[:2000])
        return record
    mismatch = compare_settings(settings, parsed["settings"])
    record.update(status="measured", settings_match=not mismatch, settings_mismatch=mismatch)
    return record
