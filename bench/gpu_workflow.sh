#!/usr/bin/env bash
# A GPU device's rows through Snakemake and Kiln's real rules on a GPU host that has no package registry,
# as README's "Several device hosts sharing storage" runs them (build host, device host, gather), with a
# folder carried between the hosts in place of shared storage. docs/latency.md records a run on an H200.
#
#   bench/gpu_workflow.sh pack   OUT    # build host (network, Kiln's venv): artifacts, wheelhouse, tarball
#   bench/gpu_workflow.sh device PACK   # GPU host, in a copy of this checkout: engines and validations
#   bench/gpu_workflow.sh gather ROWS   # build host again: summary and Kiln's page with both hosts' rows
#
# Settings (environment): DEVICE (default h200-ort), CONFIG (default config.yaml), KILN_GATHER (the devices
# the gathered summary holds, default "cpu,$DEVICE"), SITE (the GPU host's install folder, default /tmp/kiln-site).
#
# What the GPU host needs already: Python 3.12 (the wheelhouse's ABI), an NVIDIA driver, numpy, onnx,
# PyYAML, Pillow, OpenCV, matplotlib, cuda-python (cuda.bindings), and a CUDA build of torch (the PyTorch
# baseline runs on it, and importing it loads the CUDA runtime, cuBLAS and cuDNN that onnxruntime-gpu links
# against). `pack` brings the rest: onnxruntime-gpu for CUDA 13 (255 MB), and Snakemake with its pure-Python
# and compiled (cp312) requirements at requirements.lock's versions, pycocotools among them. The GPU host's
# own onnxruntime (CPU) is shadowed by onnxruntime-gpu on PYTHONPATH; nothing there is installed over.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-h200-ort}
CONFIG=${CONFIG:-config.yaml}
PY=${PY:-.venv/bin/python}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
SITE=${SITE:-/tmp/kiln-site}
# The GPU host brings these (torch's environment): the wheelhouse leaves them out.
HOST_HAS="numpy onnx protobuf ml-dtypes typing-extensions"
step() { echo "[gpu_workflow $(date +%T)] $*" >&2; }

pack() {
  local out=${1:?usage: pack OUT}
  mkdir -p "$out/wheels"
  step "artifacts for $DEVICE (ONNX variants, references, inputs) on this host"
  "$PY" -m snakemake --cores all artifacts --configfile "$CONFIG" --config devices="$DEVICE" --quiet rules
  step "wheelhouse: Snakemake's requirements at requirements.lock's versions, for CPython 3.12"
  local pins
  pins=$("$PY" - "$HOST_HAS" <<'EOF'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix",
       "platform_python_implementation": "CPython", "extra": ""}
skip = set(sys.argv[1].split())
lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.lock").read(), re.M))
lock = {k.lower().replace("_", "-"): v for k, v in lock.items()}
seen, todo = set(), ["snakemake", "pycocotools"]
while todo:
    name = todo.pop().lower().replace("_", "-")
    if name in seen or name in skip:
        continue
    seen.add(name)
    for r in md.distribution(name).requires or []:
        req = Requirement(r)
        if not req.marker or req.marker.evaluate(env):
            todo.append(req.name)
print(" ".join(f"{n}=={lock[n]}" for n in sorted(seen)))
EOF
)
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  for pin in $pins "$ORT_GPU"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d "$out/wheels" "$pin" 2>/dev/null \
      || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out/wheels" "$pin"  # pure-Python sdists
  done
  step "artifacts tarball: what the device's build, baseline and validate jobs read"
  # Snakemake with --allowed-rules plans no job for the upstream files left out (export, simplify and
  # surgery ONNX, the calibration split); identical files (the models' val inputs) travel once, hardlinked.
  local results stage
  results=$("$PY" -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['results'])")
  stage=$(mktemp -d)
  cp -al "$results" "$stage/"
  "$PY" - "$stage" <<'EOF'
import hashlib, os, sys
from pathlib import Path
seen = {}
for f in sorted(p for p in Path(sys.argv[1]).rglob("*") if p.is_file() and p.stat().st_size > 1 << 20):
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    if digest in seen:
        os.link(seen[digest], f.with_suffix(".lnk"))
        os.replace(f.with_suffix(".lnk"), f)
    else:
        seen[digest] = f
EOF
  tar -C "$stage" -czf "$out/results.tar.gz" --exclude=export.onnx --exclude=simplified.onnx \
    --exclude=surgery.onnx --exclude='calib*' --exclude=logs "$results"
  rm -rf "$stage"
  du -sh "$out"/* >&2
}

device() {
  local pack=${1:?usage: device PACK}
  step "install the wheelhouse into $SITE (no index, no dependencies resolved)"
  if python3 -m pip --version > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$pack"/wheels/*.whl
  else  # no pip in this Python: a wheel is a zip of its files, unpacked as pip --target would
    python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
      "$SITE" "$pack"/wheels/*.whl
  fi
  export PYTHONPATH="$SITE:$PWD"
  tar xzf "$pack/results.tar.gz"
  python3 -c "import torch, onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), \
o.get_available_providers(); print('torch', torch.__version__, torch.cuda.get_device_name(0), '| onnxruntime', o.__version__)"
  python3 bench/host_probe.py > host_probe.json
  step "snakemake: $DEVICE's engines, PyTorch baseline and validations"
  python3 -m snakemake --cores all engines --allowed-rules build baseline validate diagnose engines \
    --configfile "$CONFIG" --config devices="$DEVICE" --show-failed-logs 2>&1 | tee snakemake-device.log
  local results
  results=$(python3 -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['results'])")
  tar czf device-rows.tar.gz host_probe.json snakemake-device.log \
    "$results/engines/$DEVICE" "$results/validation/$DEVICE" "$results/baseline/$DEVICE" "$results/logs"
  step "device-rows.tar.gz: take it back to the build host"
}

gather() {
  local rows=${1:?usage: gather ROWS}
  tar xzf "$rows"
  local devices=${KILN_GATHER:-cpu,$DEVICE}
  step "summary and page of $devices (this host makes its own rows, takes $DEVICE's as they are)"
  "$PY" -m snakemake --cores all --configfile "$CONFIG" --config gather=true devices="$devices" --quiet rules
}

"${1:?usage: bench/gpu_workflow.sh pack|device|gather ARG}" "${@:2}"
