#!/usr/bin/env bash
# A tool for this project's own GPU test machine (a lent H200 without network), not for users of the package:
# it downloads the wheels that machine lacks, for scripts/gpu_bench.sh. Run it here (with network), then carry
# the folder to the GPU machine and `source DEST/setup-on-gpu.sh` there.
#   PREPARE_WHEELS=/path/to/prepare-wheels.sh bash scripts/prepare_gpu_wheels.sh [DEST=.whl-gpu]
#   (add DEST to .git/info/exclude)
# PREPARE_WHEELS is the test machine's own base script (tritonserver, tritonclient, vocos, text frontend),
# which lives outside this repository: ../shared/device/prepare-wheels.sh beside the checkout unless set. On top of it: cffi for
# soundfile, numpy<2 (Triton 2.51's python-backend stub crashes on BYTES inputs under numpy 2, which the GPU
# image has), and upstream f5-tts with the modules its model imports (for scripts/bench_vs_upstream.py).
# The carried tree must stay under 64 MiB: numpy is stripped of its tests (see below).
#
# FlashAttention-4 (the fa4 extra; ~110 MB with its CUDA 13 libraries, more than one call carries):
#   bash scripts/prepare_gpu_wheels.sh --fa4 [DEST=.gpufa4]      (add DEST-a/ and DEST-b/ to .git/info/exclude)
# writes DEST-a and DEST-b (each under 60 MB). On the GPU machine, two calls within its warm time: the first carries
# DEST-a and runs `mkdir -p /tmp/fa4parts && cp DEST-a/* /tmp/fa4parts/`, the second carries DEST-b and runs
# `source DEST-b/setup-fa4-on-gpu.sh` (installs into /tmp/site-fa4 and puts it on PYTHONPATH).
#
# The GPU test lane (scripts/gpu_lane.sh, docs/gpu-lane.md) needs all of it, base and FA4 (~175 MB), one command:
#   bash scripts/prepare_gpu_wheels.sh --lane [PREFIX=.gpu-lane]
# writes PREFIX-1 ... PREFIX-N (each under 50 MB: one call carries one beside the ~5 MB tree; .gitignore keeps
# .gpu-lane-*/ out of the tree that every call sends) and prints the call sequence. Every call but the last carries one part and copies it to /tmp:
#   carry PREFIX-i:  mkdir -p /tmp/gpu-lane && cp PREFIX-i/* /tmp/gpu-lane/                   (i = 1 .. N-1)
# the last carries PREFIX-N, installs everything and runs a lane part:
#   carry PREFIX-N:  source PREFIX-N/setup.sh && bash scripts/gpu_lane.sh tests
# and, while the machine stays warm (30 s between calls; /tmp lasts as long), later calls carry nothing:
#   source /tmp/gpu-lane/setup.sh && bash scripts/gpu_lane.sh server
# setup.sh installs into /tmp/site (numpy 1.26 into /tmp/site-numpy1 for the tritonserver stubs: NUMPY1_SITE),
# once; sourced again it only sets PYTHONPATH, PATH and NUMPY1_SITE.
set -euo pipefail
cd "$(dirname "$0")/.."
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "$@"
}
fa4_wheels() {  # flash-attn-4 as pinned by the fa4 extra, and what it needs that the GPU image lacks
  local pin cutlass=4.8.1  # nvidia-cutlass-dsl, as flash-attn-4's pin resolves it
  pin=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['fa4'][0])")
  dl "$pin" "nvidia-cutlass-dsl==$cutlass" "nvidia-cutlass-dsl-libs-base==$cutlass" \
    "nvidia-cutlass-dsl-libs-core==$cutlass" "nvidia-cutlass-dsl-libs-cu13==$cutlass" "apache-tvm-ffi<0.2,>=0.1.11" \
    torch-c-dlpack-ext "quack-kernels>=0.5.3" einops "cuda-bindings>=13" cuda-pathfinder "protobuf>=5"
}
base_wheels() {  # the machine's base set (PREPARE_WHEELS) and ours on top of it
  PREPARE_WHEELS=${PREPARE_WHEELS:-../shared/device/prepare-wheels.sh}  # the GPU test machine's own (see the header)
  [ -f "$PREPARE_WHEELS" ] || { echo "prepare_gpu_wheels.sh: no file $PREPARE_WHEELS (PREPARE_WHEELS)" >&2; exit 1; }
  bash "$PREPARE_WHEELS" "$DEST" > /dev/null
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
}
if [ "${1:-}" = --lane ]; then
  prefix=${2:-.gpu-lane}
  part_bytes=50000000  # 47.7 MiB a part: with the ~5 MB tree under the 64 MiB a call carries
  work=$(mktemp -d)
  DEST=$work/wheels/base && mkdir -p "$DEST" "$work/wheels/numpy1" && base_wheels && rm -f "$DEST"/*.sh
  mv "$DEST"/numpy-*.whl "$work/wheels/numpy1/"  # for the tritonserver stubs only (NUMPY1_SITE)
  # tritonclient's HTTP client (the lane's server part answers HTTP too): the GPU image has none of these
  dl geventhttpclient gevent greenlet zope.event zope.interface brotli
  DEST=$work/wheels/fa4 && mkdir -p "$DEST" && fa4_wheels
  tar -C "$work" -cf "$work/lane.tar" wheels
  rm -rf "$prefix"-[0-9]*
  split -d -a 2 -b "$part_bytes" "$work/lane.tar" "$work/lane.tar.part."
  parts=$(find "$work" -maxdepth 1 -name 'lane.tar.part.*' | sort)
  count=$(echo "$parts" | wc -l)
  i=0
  for part in $parts; do
    i=$((i + 1)) && mkdir -p "$prefix-$i" && mv "$part" "$prefix-$i/"
  done
  cat > "$prefix-$count/setup.sh" <<SETUP
# source $prefix-$count/setup.sh, or later /tmp/gpu-lane/setup.sh   (GPU machine, repo root; written by
# scripts/prepare_gpu_wheels.sh --lane). Parts 1..$((count - 1)) must be in /tmp/gpu-lane already (one call each).
_lane=/tmp/gpu-lane
if [ ! -f \$_lane/installed ]; then
  mkdir -p \$_lane && cp "\$(dirname "\${BASH_SOURCE[0]}")"/* \$_lane/ 2>/dev/null
  _parts=("\$_lane"/lane.tar.part.*) && _have=\${#_parts[@]} && [ -e "\${_parts[0]}" ] || _have=0
  if [ "\$_have" != $count ]; then
    echo "gpu lane set-up: \$_have of $count wheel parts in \$_lane; carry $prefix-1 .. $prefix-$((count - 1)) first" \\
      "(one call each: mkdir -p /tmp/gpu-lane && cp $prefix-i/* /tmp/gpu-lane/)" >&2
    return 1
  fi
  cat \$_lane/lane.tar.part.* | tar -x -C \$_lane || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
    \$_lane/wheels/base/*.whl || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-numpy1 \\
    \$_lane/wheels/numpy1/*.whl || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fa4 \\
    \$_lane/wheels/fa4/*.whl || return 1
  rm -rf \$_lane/wheels \$_lane/lane.tar.part.* && touch \$_lane/installed
fi
# numpy 1.26 only for the tritonserver stubs (NUMPY1_SITE, see scripts/gpu_bench.sh); FA4 last, after the image's
# packages; nvidia-cutlass-dsl finds its packages through a .pth file, which --target installs do not read
export PYTHONPATH=\$PWD:/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}:/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages
export PATH=/tmp/site/bin:\$PATH NUMPY1_SITE=/tmp/site-numpy1
SETUP
  rm -rf "$work"
  du -sh "$prefix"-[0-9]*
  echo "GPU lane wheels in $count parts; device calls, within the machine's warm time:"
  for i in $(seq 1 $((count - 1))); do
    echo "  $i. carry $prefix-$i: mkdir -p /tmp/gpu-lane && cp $prefix-$i/* /tmp/gpu-lane/"
  done
  echo "  $count. carry $prefix-$count: source $prefix-$count/setup.sh && bash scripts/gpu_lane.sh tests"
  echo "  then: source /tmp/gpu-lane/setup.sh && bash scripts/gpu_lane.sh server   (and soak)"
  exit 0
fi
if [ "${1:-}" = --fa4 ]; then
  DEST=$(mktemp -d)
  out=${2:-.gpufa4}
  fa4_wheels
  rm -rf "$out-a" "$out-b" && mkdir -p "$out-a" "$out-b"
  big=$(ls "$DEST"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  split -b 50000000 "$big" "$out-a/cu13.part."
  mv "$out-a"/cu13.part.a[b-z] "$out-b"/ && rm "$big" && mv "$DEST"/*.whl "$out-b"/
  cat > "$out-b/setup-fa4-on-gpu.sh" <<SETUP
# source $out-b/setup-fa4-on-gpu.sh   (GPU machine, repo root, after the call that copied $out-a to /tmp/fa4parts)
cat /tmp/fa4parts/cu13.part.* "\$(dirname "\${BASH_SOURCE[0]}")"/cu13.part.* > /tmp/fa4parts/$(basename "$big") || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fa4 \\
  /tmp/fa4parts/*.whl "\$(dirname "\${BASH_SOURCE[0]}")"/*.whl || return 1
# nvidia-cutlass-dsl finds its packages through a .pth file, which --target installs do not read
export PYTHONPATH=\${PYTHONPATH:+\$PYTHONPATH:}/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages
SETUP
  du -sh "$out-a" "$out-b"
  exit 0
fi
DEST=${1:-.whl-gpu}
base_wheels
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
