#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, in one go (random F5TTS_v1_Base weights, NFE 16, ~5 s reference +
# ~10 s generated): side by side with upstream, offline batch sweep, then Triton gRPC concurrency sweep.
#   OUT=results bash scripts/gpu_bench.sh [what...]     what: side offline server streaming (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
WHAT=${*:-side offline server streaming}
export PYTHONUNBUFFERED=1
ARCH=${ARCH:-F5TTS_v1_Base}
NFE=${NFE:-16}
for what in $WHAT; do
  case $what in
    side)
      python3 scripts/bench_vs_upstream.py --arch "$ARCH" --nfe "$NFE" --dtype fp16 --variants "${VARIANTS:-graphs,compile+graphs}" \
        --output-json "$OUT/side.json" --plot "$OUT/side.png" 2>&1 | grep -v -i warn | tee "$OUT/side.log" ;;
    offline)
      python3 benchmark.py --mode offline --random-weights "$ARCH" --nfe "$NFE" --batch-size ${BATCH_SIZES:-1,4,8,16} --num-requests 32 \
        --compile --cuda-graphs --enable-warmup --output-json "$OUT/offline.jsonl" --plot "$OUT/offline.png" 2>&1 \
        | grep -v -E "batch/s|it/s|[Ww]arn" | tee "$OUT/offline.log" ;;
    server)
      ckpt=$(mktemp -d)/ckpt
      python3 scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder
      python3 scripts/build_model_repo.py --target gpu --ckpt-dir "$ckpt" --output "$OUT/repo" --nfe "$NFE" \
        --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us 20000 --max-queue-size 256 > /dev/null
      python3 -m f5_triton.cli serve --model-repo "$OUT/repo" --log-file "$OUT/tritonserver.log" > "$OUT/server.log" 2>&1 &
      server=$!
      for _ in $(seq 300); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready')" 2>/dev/null && break; sleep 1; done
      python3 benchmark.py --mode server --server-url localhost:8001 --nfe "$NFE" --concurrency "${CONCURRENCY:-1,4,16,32}" \
        --num-requests 64 --enable-warmup --warmup 16 --output-json "$OUT/server.jsonl" --plot "$OUT/server.png" 2>&1 \
        | grep -v -E "req/s|s/req|[Ww]arn" | tee "$OUT/server.log.txt"
      kill -INT $server; wait $server
      tail -5 "$OUT/server.log" ;;
    streaming)
      python3 scripts/streaming_latency.py --random-weights "$ARCH" --device cuda --dtype fp16 --nfe "$NFE" \
        --compile --cuda-graphs ${REF_AUDIO:+--reference-audio "$REF_AUDIO"} --json "$OUT/streaming.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/streaming.log" ;;
  esac
done
