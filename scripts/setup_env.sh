#!/usr/bin/env bash
# Create .venv (idempotent) with the package, its serving/ONNX/TensorRT-RTX extras and the test tools.
# torch is pinned by constraints.txt for development and CI; the package itself only needs torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.f5-triton-installed
inputs=$(cat pyproject.toml constraints.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[onnx,serve,bench,tensorrt-rtx]" -r requirements-dev.txt
  # upstream F5-TTS, for parity tests and side-by-side benchmarks only (never imported by the package)
  .venv/bin/python -m pip install -q --no-deps f5-tts==1.1.22
  echo "$inputs" > "$stamp"
fi
