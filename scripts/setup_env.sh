#!/usr/bin/env bash
# Create .venv and install edgedistill with its tests' tools. Idempotent: re-running with an unchanged
# pyproject.toml installs nothing. torch comes first (pinned: pip takes these wheels from local disk
# where they are cached), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.edgedistill-installed"
want=$(cat pyproject.toml jetson/setup.py 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null || \
    "$VENV/bin/python" -m pip install -q $TORCH_PINS 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -m pip install -q -e ".[test,slim,pretrained,anomaly,tracking,tune]" 2>&1 | grep -v '^WARNING: Location' || true
  # NVIDIA's TensorRT 10 type stubs for the API-surface test; --no-deps: its 'tensorrt' dependency comes from
  # NVIDIA's own index, which this machine cannot reach (and the tests need no real TensorRT)
  "$VENV/bin/python" -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import edgedistill, edgerun, torch, timm, onnxruntime, tensorrt_bindings, mlflow, optuna"
  echo "$want" > "$stamp"
fi
# the oldest published TensorRT 10 stubs too (10.8; none exist for JetPack 6's 10.3), beside the venv's packages
[ -f "$VENV/trt-stubs-10.8/tensorrt_bindings/tensorrt.pyi" ] || \
  "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/trt-stubs-10.8" "tensorrt-stubs==10.8.0.43.1" 2>&1 \
    | grep -v '^WARNING: Location' || true
