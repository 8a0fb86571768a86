"""The host: what this machine offers to build or run engines, and whether it is a device's.

:func:`detect_host` describes the GPU, the CUDA driver, Jetson-ness and the installed TensorRT /
TensorRT-RTX; :func:`guard` compares that with a device profile. Neither needs a GPU: without
one they report "no GPU" rather than fail. :func:`timing_cache_key` names a timing cache after
the host it was measured on.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.backends.trt.importer import major_minor, mm_str, trt_version

log = logging.getLogger(__name__)

BUILDING_ON_DEVICES = "README: Building on devices"


@dataclass(frozen=True)
class HostInfo:
    """What this machine offers to build or run engines. Tests pass made-up ones to :func:`guard`."""

    compute_capability: str | None = None  # of the first visible GPU, e.g. "8.9"
    gpu: str | None = None  # its name
    gpu_count: int = 0
    driver: bool = False  # a CUDA driver answered
    cuda_driver: str | None = None  # CUDA version the driver supports, e.g. "12.4"
    jetson: bool = False
    tensorrt: str | None = None
    tensorrt_rtx: str | None = None
    probe: str = "none"  # how the GPU was found: cuda.bindings | nvidia-smi | none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe_cuda_bindings() -> dict[str, Any] | None:
    """Ask the CUDA driver through cuda-python; None when cuda.bindings is not installed."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return None
    ok = cu.CUresult.CUDA_SUCCESS
    try:
        (err,) = cu.cuInit(0)
    except Exception:  # cuda-bindings raises (DynamicLibNotFoundError) when libcuda is missing
        return {"driver": False, "probe": "cuda.bindings"}
    if err != ok:
        return {"driver": False, "probe": "cuda.bindings"}
    info: dict[str, Any] = {"driver": True, "probe": "cuda.bindings"}
    err, version = cu.cuDriverGetVersion()
    if err == ok:
        info["cuda_driver"] = f"{version // 1000}.{(version % 1000) // 10}"
    err, count = cu.cuDeviceGetCount()
    if err != ok or count == 0:
        return info
    info["gpu_count"] = int(count)
    err, dev = cu.cuDeviceGet(0)
    if err != ok:
        return info
    attr = cu.CUdevice_attribute
    err1, major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    err2, minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    if err1 == ok and err2 == ok:
        info["compute_capability"] = f"{major}.{minor}"
    err, name = cu.cuDeviceGetName(256, dev)
    if err == ok:
        info["gpu"] = bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip()
    return info


def _probe_nvidia_smi() -> dict[str, Any] | None:
    """Ask nvidia-smi; None when it is not on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {"driver": False, "probe": "nvidia-smi"}
    if out.returncode != 0:
        # nvidia-smi without a working driver exits non-zero ("couldn't communicate with the driver").
        return {"driver": False, "probe": "nvidia-smi"}
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    info: dict[str, Any] = {"driver": True, "probe": "nvidia-smi", "gpu_count": len(rows)}
    if rows:
        info["gpu"] = rows[0][0]
        if len(rows[0]) > 1 and re.fullmatch(r"\d+\.\d+", rows[0][1]):
            info["compute_capability"] = rows[0][1]
    try:
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        header = ""
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header)
    if m:
        info["cuda_driver"] = m.group(1)
    return info


def _is_jetson() -> bool:
    # L4T writes /etc/nv_tegra_release; the device tree names the module ("NVIDIA Jetson AGX Orin ...").
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        model = Path("/proc/device-tree/model").read_bytes().decode(errors="replace").lower()
    except OSError:
        return False
    return "jetson" in model


@functools.lru_cache(maxsize=1)
def _probe_gpu() -> dict[str, Any]:
    # Cached: the Snakefile asks every device's backend, and nvidia-smi costs a subprocess each time.
    for probe in (_probe_cuda_bindings, _probe_nvidia_smi):
        try:
            found = probe()
        except Exception as err:  # a broken driver install must not stop config loading
            log.warning("GPU probe %s failed: %s", probe.__name__, err)
            found = None
        if found is not None and (found.get("driver") or probe is _probe_nvidia_smi):
            return found
    return {}


def detect_host() -> HostInfo:
    """Describe this machine: GPU, CUDA driver, Jetson-ness, installed TensorRT / TensorRT-RTX.

    Tries cuda-python's ``cuda.bindings`` first, then ``nvidia-smi``; with neither (or no
    driver) the host has "no GPU". Never raises for a missing GPU or driver.
    """
    return HostInfo(
        jetson=_is_jetson(),
        tensorrt=trt_version("tensorrt"),
        tensorrt_rtx=trt_version("tensorrt-rtx"),
        **_probe_gpu(),
    )


def _cc(text: str | None) -> tuple[int, int] | None:
    return major_minor(text) if text else None


def _range_str(lo: str | None, hi: str | None) -> str:
    lo_v, hi_v = major_minor(lo), major_minor(hi or lo)
    return mm_str(lo_v) if lo_v == hi_v else f"{mm_str(lo_v)} to {mm_str(hi_v)}"


def guard(device, host: HostInfo, runtime: str = "TensorRT") -> str | None:
    """Why ``host`` is not the device that ``device``'s engines are for, or None when it is.

    Compares the host's GPU compute capability, its ``runtime`` version (TensorRT, or
    TensorRT-RTX for those devices) major.minor against ``tensorrt.min``..``tensorrt.max``, and
    Jetson-ness. With ``hardware_compatibility: ampere_plus`` any discrete GPU of compute
    capability 8.0 or newer will do. The message names what the device needs and what the host
    has, and the fix.
    """
    host_version = host.tensorrt_rtx if runtime == "TensorRT-RTX" else host.tensorrt
    want_cc, have_cc = _cc(device.compute_capability), _cc(host.compute_capability)
    ampere_plus = getattr(device, "hardware_compatibility", "none") == "ampere_plus"
    if want_cc is None:
        cc_ok = True
    elif ampere_plus:
        cc_ok = have_cc is not None and have_cc >= (8, 0)
    else:
        cc_ok = have_cc == want_cc
    lo, hi = major_minor(device.tensorrt_min), major_minor(device.tensorrt_max or device.tensorrt_min)
    have_v = major_minor(host_version)
    version_ok = lo is None or (have_v is not None and lo <= have_v <= hi)
    jetson_ok = bool(host.jetson) == bool(device.jetson)
    if cc_ok and version_ok and jetson_ok:
        return None

    needs, has = [], []
    if want_cc is not None:
        needs.append("an Ampere or newer GPU (compute capability 8.0+)" if ampere_plus
                     else f"compute capability {device.compute_capability}")
        has.append(host.compute_capability or "no GPU")
    if lo is not None:
        needs.append(f"{runtime} {_range_str(device.tensorrt_min, device.tensorrt_max)}")
        has.append(f"{runtime} {mm_str(have_v)}" if have_v else f"no {runtime}")
    need_text, have_text = " and ".join(needs), " and ".join(has)
    if not jetson_ok:
        need_text += " on a Jetson" if device.jetson else " on a discrete GPU"
        have_text += " on a Jetson" if host.jetson else ("" if have_cc is None else " on a discrete GPU")
    return (
        f"engine for device '{device.name}' needs {need_text}; this host has {have_text}: "
        f"run this job on that device ({BUILDING_ON_DEVICES})"
    )


def timing_cache_key(host: HostInfo, tensorrt_version: str | None = None) -> str:
    """A file-name-safe key for a timing cache: GPU, compute capability, CUDA and TensorRT versions.

    A timing cache holds kernel timings of one GPU model under one CUDA and TensorRT version;
    mixing hosts in one file would make the builder trust timings taken elsewhere. The caller
    puts the key into the cache's file name, e.g. ``timing-{key}.cache`` under a per-device
    folder, and passes that path as the ``timing_cache`` build option.
    """
    parts = [
        host.gpu or "nogpu",
        f"sm{(host.compute_capability or '0.0').replace('.', '')}",
        f"cuda{host.cuda_driver or 'none'}",
        f"trt{tensorrt_version or host.tensorrt or 'none'}",
    ]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")
