#!/usr/bin/env bash
# A tool for this project's own GPU test machine (a lent H200 without network), not for users of the package:
# it downloads the wheels that machine lacks, for scripts/gpu_bench.sh. Run it here (with network), then carry
# the folder to the GPU machine and `source DEST/setup-on-gpu.sh` there.
#   PREPARE_WHEELS=/path/to/prepare-wheels.sh bash scripts/prepare_gpu_wheels.sh [DEST=.whl-gpu]
#   (add DEST to .git/info/exclude)
# PREPARE_WHEELS is the test machine's own base script (tritonserver, tritonclient, vocos, text frontend),
# which lives outside this repository. On top of it: cffi for
# soundfile, numpy<2 (Triton 2.51's python-backend stub crashes on BYTES inputs under numpy 2, which the GPU
# image has), and upstream f5-tts with the modules its model imports (for scripts/bench_vs_upstream.py).
# The carried tree must stay under 64 MiB: numpy is stripped of its tests (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl-gpu}
PREPARE_WHEELS=${PREPARE_WHEELS:?set PREPARE_WHEELS to the prepare-wheels.sh of the GPU test machine (see the header)}
[ -f "$PREPARE_WHEELS" ] || { echo "prepare_gpu_wheels.sh: no file $PREPARE_WHEELS (PREPARE_WHEELS)" >&2; exit 1; }
bash "$PREPARE_WHEELS" "$DEST" > /dev/null
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "$@"
}
dl cffi pycparser "numpy==1.26.4" f5-tts==1.1.22 x-transformers==2.31.10 einx==0.4.3 loguru==0.7.3 \
  torch-einops-utils frozendict
# Fit the 64 MiB carry limit: numpy's own tests, f2py and stubs are not needed to run (saves ~2 MB).
python3 - "$DEST"/numpy-*.whl <<'PY'
import os, sys, zipfile
path = sys.argv[1]
skip = ("/tests/", "numpy/f2py/", "numpy/distutils/", "numpy/_pyinstaller/", "numpy/doc/")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
    for item in src.infolist():
        if not any(s in item.filename for s in skip) and not item.filename.endswith(".pyi"):
            dst.writestr(item, src.read(item.filename))
os.replace(path + ".tmp", path)
PY
# Our own setup script: numpy 1.26 goes to a folder of its own that only the server gets (gpu_bench.sh puts
# $NUMPY1_SITE first on the server's PYTHONPATH); everything else keeps the image's numpy 2 (its scipy needs it).
cat > "$DEST/setup-on-gpu.sh" <<'SETUP'
# source DEST/setup-on-gpu.sh   (on the GPU machine, repo root; written by scripts/prepare_gpu_wheels.sh)
_wheels=$(dirname "${BASH_SOURCE[0]}")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls "$_wheels"/*.whl | grep -v /numpy-) || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-numpy1 \
  "$_wheels"/numpy-*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH NUMPY1_SITE=/tmp/site-numpy1
SETUP
du -sh "$DEST"
