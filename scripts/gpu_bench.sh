#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, in one go (random F5TTS_v1_Base weights, NFE 16, ~5 s reference +
# ~10 s generated): side by side with upstream, offline batch sweep, then Triton gRPC concurrency sweep.
#   OUT=results bash scripts/gpu_bench.sh [what...]     what: side offline server streaming multigpu
#                                                       redundancy soak kill (docs/reliability.md)
#   (default: all but multigpu, which wants a machine of several GPUs: kind nvidia-h200-x2, and the reliability runs)
# Wheels for the lent GPU machine: scripts/prepare_gpu_wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
WHAT=${*:-side offline server streaming}
export PYTHONUNBUFFERED=1
ARCH=${ARCH:-F5TTS_v1_Base}
# Triton 2.51's python-backend stubs crash on BYTES inputs under numpy 2: the server may get numpy 1.26
# (NUMPY1_SITE, see scripts/prepare_gpu_wheels.sh) while everything else keeps the image's numpy.
SERVER_PYTHONPATH=${NUMPY1_SITE:+$NUMPY1_SITE:}${PYTHONPATH:-}
NFE=${NFE:-16}
wait_ready() {  # until the server is ready (models loaded and warmed up: compile, CUDA graphs); prints how long
  local start=$SECONDS
  for _ in $(seq 400); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready')" 2>/dev/null && break
    sleep 1
  done
  echo "$1: server ready after $((SECONDS - start)) s"
}
for what in $WHAT; do
  case $what in
    side)
      python3 scripts/bench_vs_upstream.py --arch "$ARCH" --nfe "$NFE" --dtype fp16 --variants "${VARIANTS:-compile+stepgraphs,compile+graphs}" \
        --output-json "$OUT/side.json" --plot "$OUT/side.png" 2>&1 | grep -v -i warn | tee "$OUT/side.log" ;;
    offline)
      python3 benchmark.py --mode offline --random-weights "$ARCH" --nfe "$NFE" --batch-size "${BATCH_SIZES:-1,4,8,16}" --num-requests 32 \
        --compile --cuda-graphs --enable-warmup --output-json "$OUT/offline.jsonl" --plot "$OUT/offline.png" 2>&1 \
        | grep -v -E "batch/s|it/s|[Ww]arn" | tee "$OUT/offline.log" ;;
    server)
      ckpt=$(mktemp -d)/ckpt
      python3 scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder
      python3 scripts/build_model_repo.py --target gpu --ckpt-dir "$ckpt" --output "$OUT/repo" --nfe "$NFE" \
        --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 256 > /dev/null
      PYTHONPATH=$SERVER_PYTHONPATH python3 -m f5_triton.cli serve --model-repo "$OUT/repo" --log-file "$OUT/tritonserver.log" > "$OUT/server.log" 2>&1 &
      server=$!
      wait_ready server | tee -a "$OUT/server.log.txt"
      python3 benchmark.py --mode server --server-url localhost:8001 --nfe "$NFE" --concurrency "${CONCURRENCY:-1,4,16,32}" \
        --num-requests 64 --enable-warmup --warmup 16 --output-json "$OUT/server.jsonl" --plot "$OUT/server.png" 2>&1 \
        | grep -v -E "req/s|s/req|[Ww]arn" | tee "$OUT/server.log.txt"
      kill -TERM $server; wait $server  # not INT: background jobs of a script ignore SIGINT
      tail -5 "$OUT/server.log" ;;
    redundancy|soak|kill)
      # issue 22. redundancy: one vs two flow-matching instances on GPU 0, throughput at c16/c32 and GPU memory.
      # soak: 5 minutes of mixed load (GPU memory included). kill: 3 minutes, a flow process killed 60 s in.
      ckpt=$(mktemp -d)/ckpt
      python3 scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder
      counts=${FLOW_INSTANCES:-2}
      [ "$what" = redundancy ] && counts="1 2"
      for n in $counts; do
        python3 scripts/build_model_repo.py --target gpu --ckpt-dir "$ckpt" --output "$OUT/repo-flow$n" --nfe "$NFE" \
          --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 256 \
          --flow-instances "$n" --no-streaming > /dev/null
        PYTHONPATH=$SERVER_PYTHONPATH python3 -m f5_triton.cli serve --model-repo "$OUT/repo-flow$n" \
          --log-file "$OUT/tritonserver-$what-flow$n.log" > "$OUT/server-$what-flow$n.log" 2>&1 &
        server=$!
        wait_ready "$what flow instances=$n" | tee -a "$OUT/$what.log"
        echo "flow instances=$n: GPU memory used after warm-up: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader -i 0)" \
          | tee -a "$OUT/$what.log"
        case $what in
          redundancy) python3 benchmark.py --mode server --server-url localhost:8001 --nfe "$NFE" --concurrency 16,32 \
                        --num-requests 128 --enable-warmup --warmup 32 --label "flow=$n" --output-json "$OUT/redundancy.jsonl" 2>&1 \
                        | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/$what.log" ;;
          soak) python3 scripts/soak.py --server-url localhost:8001 --minutes 5 --concurrency 16 --json "$OUT/soak.json" \
                  --plot "$OUT/soak.png" > "$OUT/soak.txt" 2>&1; head -12 "$OUT/soak.txt" | tee -a "$OUT/$what.log" ;;
          kill) python3 scripts/soak.py --server-url localhost:8001 --minutes 3 --concurrency 16 --kill-after 60 \
                  --json "$OUT/kill.json" --plot "$OUT/kill.png" > "$OUT/kill.txt" 2>&1; head -16 "$OUT/kill.txt" | tee -a "$OUT/$what.log" ;;
        esac
        kill -TERM $server; wait $server  # not INT: background jobs of a script ignore SIGINT
      done ;;
    multigpu)
      # issue 9: aggregate throughput at high concurrency, one GPU vs all visible GPUs, same machine and run
      ckpt=$(mktemp -d)/ckpt
      python3 scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder
      all=$(python3 -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")
      if [ "${OFFLINE_FIRST:-1}" = 1 ]; then  # offline batch 1 first, GPU idle otherwise: issue 5's c1 comparison in one run
        python3 benchmark.py --mode offline --random-weights "$ARCH" --nfe "$NFE" --batch-size 1 --num-requests 32 \
          --compile --cuda-graphs --enable-warmup --label offline --output-json "$OUT/multigpu.jsonl" 2>&1 \
          | grep -v -E "batch/s|it/s|[Ww]arn" | tee -a "$OUT/multigpu.log"
      fi
      for gpus in ${MULTI_GPUS:-0 all}; do  # e.g. MULTI_GPUS=all OFFLINE_FIRST=0: only the server on every GPU
        [ "$gpus" = all ] && gpus=$all
        python3 scripts/build_model_repo.py --target gpu --ckpt-dir "$ckpt" --output "$OUT/repo-$gpus" --nfe "$NFE" \
          --gpus "$gpus" --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" \
          --max-queue-size 512 --preprocess-instances 4 --postprocess-instances 4 \
          --flow-instances "${FLOW_INSTANCES:-1}" --no-streaming > /dev/null
        PYTHONPATH=$SERVER_PYTHONPATH python3 -m f5_triton.cli serve --model-repo "$OUT/repo-$gpus" --log-file "$OUT/tritonserver-$gpus.log" \
          > "$OUT/server-$gpus.log" 2>&1 &
        server=$!
        wait_ready "gpus=$gpus" | tee -a "$OUT/multigpu.log"
        if [ "$gpus" = 0 ]; then  # latency at concurrency 1 and throughput at 16 on the same server (issue 5)
          python3 benchmark.py --mode server --server-url localhost:8001 --nfe "$NFE" --concurrency 1,16 --num-requests 64 \
            --enable-warmup --warmup 16 --label "gpus=$gpus" --output-json "$OUT/multigpu.jsonl" 2>&1 \
            | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/multigpu.log"
        fi
        python3 benchmark.py --mode server --server-url localhost:8001 --nfe "$NFE" --concurrency "${MULTI_CONCURRENCY:-64}" \
          --num-requests 256 --enable-warmup --warmup 32 --label "gpus=$gpus" --output-json "$OUT/multigpu.jsonl" 2>&1 \
          | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/multigpu.log"
        kill -TERM $server; wait $server  # not INT: background jobs of a script ignore SIGINT
      done
      python3 scripts/plot_results.py "$OUT/multigpu.jsonl" --output "$OUT/multigpu.png" --title "Triton gRPC, $ARCH, NFE $NFE" ;;
    streaming)
      python3 scripts/streaming_latency.py --random-weights "$ARCH" --device cuda --dtype fp16 --nfe "$NFE" \
        --compile --cuda-graphs ${REF_AUDIO:+--reference-audio "$REF_AUDIO"} --json "$OUT/streaming.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/streaming.log" ;;
  esac
done
