#!/usr/bin/env bash
# The GPU test lane (docs/gpu-lane.md): what CI on the CPU cannot run, on a GPU machine, in parts that each fit one
# device call (< 9 min). Each part writes OUT/gpu-lane-PART.json (date, card, commit, pass/fail/skip per test,
# figures) and exits non-zero on any failure, and on any skip but the documented hardware ones.
#   bash scripts/gpu_lane.sh PART...     PART: tests | server | soak | server-soak | bench | all (= tests server soak bench)
#   tests   every GPU-only test (marker gpu: tests/test_model.py, test_engines.py, test_tensorrt.py's plan run) and
#           the production path's accuracy test (tests/test_gpu_lane.py), with FlashAttention-4 installed
#   server  the GPU-target Triton server (tests/test_gpu_server.py): gRPC, HTTP, streaming, a killed stub
#   soak    GPU_SOAK_SECONDS (default 300) of mixed traffic against that server: 0 failures, memory flat
#   server-soak  both on one server start (one call of ~8 min instead of two with a start each)
#   bench   scripts/bench_vs_upstream.py, gated on --max-rel-l2 (upstream beside FA4)
# Set-up on the GPU machine (no network): the wheels of `bash scripts/prepare_gpu_wheels.sh --lane`, whose header
# gives the call sequence; then `source /tmp/gpu-lane/setup.sh && bash scripts/gpu_lane.sh PART` per call.
# OUT (default gpu_lane_out) holds the results; the lead copies them to docs/results and the table of
# docs/benchmarks.md ("GPU test lane"). GPU_LANE_DRY=1: print what each part would run, run nothing (CPU check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_lane_out}
PY=${PY:-python3}
PARTS=${*:-all}
[ "$PARTS" = all ] && PARTS="tests server soak bench"
# Skips that the lane accepts: hardware this machine lacks (documented in docs/gpu-lane.md); any other skip fails.
ALLOWED_SKIPS='Hopper|needs two CUDA GPUs'
mkdir -p "$OUT"
export GPU_LANE_OUT=$OUT  # tests add their figures to $OUT/figures.json
run() { if [ "${GPU_LANE_DRY:-0}" = 1 ]; then echo "dry run: $*"; else "$@"; fi; }
if [ "${GPU_LANE_DRY:-0}" != 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_lane.sh: no CUDA device here')" || exit 2
  "$PY" -c "import sys, torch; from f5_triton.model import fa4
sys.exit(0 if fa4.works(torch.device('cuda'), torch.float16) else 'gpu_lane.sh: flash-attn-4 does not run here: '
         'the lane tests the FA4 path (source the lane set-up, scripts/prepare_gpu_wheels.sh --lane)')" || exit 2
fi
status=0
for part in $PARTS; do
  xml=$OUT/gpu-lane-$part.xml
  rm -f "$OUT/figures.json"
  case $part in
    tests) files=$(grep -l "mark.gpu" tests/test_*.py | grep -v test_gpu_server.py | tr '\n' ' ')
           # shellcheck disable=SC2086  # $files: several paths
           run "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu $files --junitxml="$xml" --timeout=500 ;;
    server) run "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_server.py -k "not soak" --junitxml="$xml" \
              --timeout=520 ;;
    soak) run "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_server.py -k soak --junitxml="$xml" \
            --timeout=560 ;;
    server-soak) run "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_server.py --junitxml="$xml" \
                   --timeout=580 ;;
    bench) run "$PY" scripts/bench_vs_upstream.py --arch F5TTS_v1_Base --nfe 16 --dtype fp16 --repeats 3 \
             --variants compile+graphs --output-json "$OUT/bench.json" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
           code=${PIPESTATUS[0]}
           [ "${GPU_LANE_DRY:-0}" = 1 ] || "$PY" - "$xml" "$code" <<'PY'
import sys
from xml.sax.saxutils import quoteattr
failed = sys.argv[2] != "0"
body = "<failure message='exit status %s: see bench.log'/>" % sys.argv[2] if failed else ""
open(sys.argv[1], "w").write(f"<testsuite><testcase classname='scripts' name={quoteattr('bench_vs_upstream.py --max-rel-l2')}>"
                             f"{body}</testcase></testsuite>")
PY
           ;;
    *) echo "gpu_lane.sh: unknown part '$part' (tests, server, soak, server-soak, bench, all)" >&2; exit 2 ;;
  esac
  [ "${GPU_LANE_DRY:-0}" = 1 ] && continue
  "$PY" scripts/gpu_lane_result.py "$part" "$xml" "$ALLOWED_SKIPS" "$OUT" || status=1
done
exit $status
