#!/usr/bin/env bash
# Install a CPU-capable tritonserver (from nvidia-pytriton's wheel) and tritonclient into DIR, beside Kiln's
# virtualenv, never into it: nvidia-pytriton declares numpy<2, so every package goes in with --no-deps.
#   Usage: scripts/install_triton.sh DIR [PYTHON]    (PYTHON: Kiln's interpreter, default python3)
# Then: export KILN_TRITON_DIR=DIR/server KILN_TRITON_SITE=DIR/site  (tests/test_serve.py reads them).
set -euo pipefail
DIR=${1:?usage: scripts/install_triton.sh DIR [PYTHON]}
PY=${2:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR/pytriton" nvidia-pytriton==0.7.0
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR/site" \
  tritonclient==2.73.0 geventhttpclient==2.6.1 gevent==26.9.0 zope.event==6.2 zope.interface==8.7 \
  brotli==1.2.1 python-rapidjson==1.25
TS="$DIR/pytriton/pytriton/tritonserver"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
STUB="$TS/python_backend_stubs/$PYVER/triton_python_backend_stub"
[ -f "$STUB" ] || { echo "install_triton: no Python backend stub for Python $PYVER in nvidia-pytriton 0.7.0" >&2; exit 1; }
# In place, beside the backend: the stub's RPATHs are relative to it.
cp "$STUB" "$TS/backends/python/"
ln -sfn "$TS" "$DIR/server"
echo "export KILN_TRITON_DIR=$DIR/server KILN_TRITON_SITE=$DIR/site"
