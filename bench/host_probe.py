"""What Kiln's host probe and device guards find on this host, as JSON (run on a GPU host; needs no TensorRT).

    python3 bench/host_probe.py > host.json

Prints kiln.backends.trt.host.detect_host(), and the reason each demo-style device (an H100 on
TensorRT 11, an RTX 4090 on TensorRT-RTX, an ONNX Runtime CUDA device) gives for not running here,
or null where it would run. docs/latency.md records what it printed on the lent GPU machines.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln import backends  # noqa: E402
from kiln.backends.trt.host import detect_host  # noqa: E402
from kiln.specs import DeviceProfile  # noqa: E402


def device(name: str, backend: str, **kw) -> DeviceProfile:
    base = {"name": name, "backend": backend, "opset": 17, "precisions": ("fp32",), "providers": ("CPUExecutionProvider",),
            "threads": 0, "batch_sizes": (1,), "models": ()}
    return DeviceProfile(**{**base, **kw})


def main() -> None:
    host = detect_host()
    devices = [
        device("h100", "tensorrt", compute_capability="9.0", tensorrt_min="11.0", tensorrt_max="11.99"),
        device("h200", "tensorrt", compute_capability="9.0", tensorrt_min="10.0", tensorrt_max="10.99"),
        device("rtx-4090", "tensorrt-rtx", compute_capability="8.9"),
        device("ort-cuda", "onnxruntime", providers=("CUDAExecutionProvider",)),
    ]
    out = {"host": dataclasses.asdict(host),
           "devices": {d.name: {"backend": d.backend, "check_host": backends.get(d.backend).check_host(d),
                                "check_build_host": backends.get(d.backend).check_build_host(d)} for d in devices}}
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
