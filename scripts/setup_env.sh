#!/usr/bin/env bash
# Create .venv (idempotent) with the package.
#   bash scripts/setup_env.sh        serving: the package with its onnx, serve and gateway extras
#   bash scripts/setup_env.sh dev    development (scripts/test.sh): the dev extra too (test and lint tools,
#                                    plots) and upstream F5-TTS without its dependencies, for parity tests
# torch is pinned by constraints.txt for development and CI; the package itself only needs torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-serve}
case "$MODE" in
  serve) extras=onnx,serve,gateway ;;
  dev) extras=dev ;;
  *) echo "setup_env.sh: usage: bash scripts/setup_env.sh [serve|dev]" >&2; exit 2 ;;
esac
say() { printf '%s\n' "setup_env: $*"; }
PYTHON=${PYTHON:-python3}
stamp=.venv/.f5-triton-installed
inputs=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
# A dev environment serves too; a serving one lacks the dev tools.
if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$inputs dev" ] || [ "$(cat "$stamp")" = "$inputs $MODE" ]; }; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  say "[1/3] creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
say "[2/3] installing f5-triton[$extras] and its dependencies into .venv"
say "      torch with its CUDA libraries is a few GB: the first time takes minutes (pip shows each package)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install --progress-bar on -c constraints.txt -e ".[$extras]" \
  || { say "pip install failed (see above)"; exit 1; }
if [ "$MODE" = dev ]; then
  say "[3/3] upstream F5-TTS 1.1.22 without its dependencies (parity tests and side-by-side benchmarks only)"
  .venv/bin/python -m pip install -q --no-deps f5-tts==1.1.22
else
  say "[3/3] done (the test suite adds the dev extra: bash scripts/test.sh)"
fi
echo "$inputs $MODE" > "$stamp"
