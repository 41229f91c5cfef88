#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, in one go (random F5TTS_v1_Base weights, NFE 16, ~5 s reference +
# ~10 s generated): side by side with upstream, offline batch sweep, then Triton gRPC concurrency sweep.
#   OUT=results bash scripts/gpu_bench.sh [what...]     what: side offline server streaming multigpu traffic
#     stream_sweep stream_rate redundancy soak kill (the last three: docs/reliability.md)
#   (default: side offline server streaming; each other mode is a device call of its own)
# traffic (issue 17, one device call of ~9 min): the uniform and the mixed-length sets side by side, offline batch
#   1 and 16, Triton gRPC concurrency 1, 16, 64, each as a first pass after "ready" (cold) and a second (warm);
#   time to ready in traffic-offline.log / traffic-server.log. Its two halves alone: traffic-offline (cut at
#   TRAFFIC_OFFLINE_S seconds, rows kept as measured), traffic-server. A dry run on the CPU:
#   ARCH=tiny NFE=2 TARGET=cpu TRAFFIC_REQUESTS=4 TRAFFIC_CONCURRENCY=1,2 PY=.venv/bin/python \
#     HTTP_PORT=18000 GRPC_PORT=18001 METRICS_PORT=18002 bash scripts/gpu_bench.sh traffic
#   traffic-server with STREAM_CONCURRENCY (e.g. 1,8,16): f5_tts_streaming (GRANULARITY, default cohort) on the same
#   server, its cold and warm passes after the traffic rows, then f5_tts at 16 on the same texts (the ratio's base);
#   STREAM_SETS: the built-in sets streamed (default paragraphs; e.g. paragraphs,mixed,uniform).
# stream_sweep (issue 18): f5_tts_streaming over gRPC at concurrency 1..32, each scheduler granularity, cold and
#   warm passes, and f5_tts at concurrency 16 for the throughput ratio; on CPU with the tiny model first:
#   TARGET=cpu ARCH=tiny FULL_VOCODER=0 NFE=2 STREAM_CONCURRENCY=1,2 STREAM_REQUESTS=2 bash scripts/gpu_bench.sh stream_sweep
# stream_rate (issue 36, one device call of ~7 min, server start included): open-loop Poisson arrivals on one server
#   (traffic-server's): each set of STREAM_SETS (default paragraphs,mixed,uniform) streamed at STREAM_RATES requests/s
#   (default 2,4,6,8,12,16; RATE_REQUESTS, default 32, per rate), f5_tts at the same rates on RATE_WHOLE_SETS (default
#   mixed), then closed-loop bursts RATE_CLOSED (default 8,16,32,64) streamed on mixed and f5_tts at RATE_WHOLE_CLOSED
#   (default 16,32; empty: none) on mixed, the throughput ratio's base; stream_rate.jsonl (open loop, its
#   capacity lines in stream_rate.log), stream_rate-closed.jsonl, stream_rate.png. Each benchmark is cut at RATE_STEP_S
#   (default 100) seconds, rows kept as measured. A dry run on the CPU:
#   ARCH=tiny NFE=2 TARGET=cpu FULL_VOCODER=0 STREAM_RATES=2,inf RATE_REQUESTS=3 RATE_CLOSED=2 PY=.venv/bin/python \
#     HTTP_PORT=18000 GRPC_PORT=18001 METRICS_PORT=18002 bash scripts/gpu_bench.sh stream_rate
# Wheels for the lent GPU machine: scripts/prepare_gpu_wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
WHAT=${*:-side offline server streaming}
WHAT=$(for w in $WHAT; do [ "$w" = traffic ] && echo traffic-offline traffic-server || echo "$w"; done)
export PYTHONUNBUFFERED=1
ARCH=${ARCH:-F5TTS_v1_Base}
# Triton 2.51's python-backend stubs crash on BYTES inputs under numpy 2: the server may get numpy 1.26
# (NUMPY1_SITE, see scripts/prepare_gpu_wheels.sh) while everything else keeps the image's numpy.
SERVER_PYTHONPATH=${NUMPY1_SITE:+$NUMPY1_SITE:}${PYTHONPATH:-}
NFE=${NFE:-16}
PY=${PY:-python3}
HTTP_PORT=${HTTP_PORT:-8000}  # traffic mode's server (the other modes use Triton's default ports)
GRPC_PORT=${GRPC_PORT:-8001}
wait_ready() {  # until the server is ready (models loaded and warmed up: compile, CUDA graphs); prints how long
  local start=$SECONDS
  for _ in $(seq 400); do
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready')" 2>/dev/null && break
    if [ -n "${server:-}" ] && ! kill -0 "$server" 2>/dev/null; then echo "$1: the server exited"; return 1; fi
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
      "$PY" scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder > /dev/null
      counts=${FLOW_INSTANCES:-2}
      [ "$what" = redundancy ] && counts="1 2"
      for n in $counts; do
        "$PY" scripts/build_model_repo.py --target "${TARGET:-gpu}" --ckpt-dir "$ckpt" --output "$OUT/repo-flow$n" --nfe "$NFE" \
          --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 256 \
          --flow-instances "$n" --no-streaming > /dev/null
        PYTHONPATH=$SERVER_PYTHONPATH "$PY" -m f5_triton.cli serve --model-repo "$OUT/repo-flow$n" --http-port "$HTTP_PORT" \
          --grpc-port "$GRPC_PORT" --metrics-port "${METRICS_PORT:-8002}" \
          --log-file "$OUT/tritonserver-$what-flow$n.log" > "$OUT/server-$what-flow$n.log" 2>&1 &
        server=$!
        wait_ready "$what flow instances=$n" | tee -a "$OUT/$what.log"
        command -v nvidia-smi > /dev/null && echo "flow instances=$n: GPU memory used after warm-up: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader -i 0)" \
          "per process: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ';')" \
          | tee -a "$OUT/$what.log"
        if [ "$what" = soak ]; then  # the first traffic after "ready" (cold), both sets, before the soak
          "$PY" benchmark.py --mode server --server-url "localhost:$GRPC_PORT" --nfe "$NFE" --set uniform,mixed --concurrency 16 \
            --num-requests 64 --label "flow=$n" --output-json "$OUT/soak-traffic.jsonl" 2>&1 \
            | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/$what.log"
        fi
        case $what in
          redundancy) "$PY" benchmark.py --mode server --server-url "localhost:$GRPC_PORT" --nfe "$NFE" --concurrency 16,32 \
                        --num-requests 128 --enable-warmup --warmup 32 --label "flow=$n" --output-json "$OUT/redundancy.jsonl" 2>&1 \
                        | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/$what.log" ;;
          soak) "$PY" scripts/soak.py --server-url "localhost:$GRPC_PORT" --minutes "${SOAK_MINUTES:-5}" --concurrency 16 --json "$OUT/soak.json" \
                  --plot "$OUT/soak.png" > "$OUT/soak.txt" 2>&1; head -12 "$OUT/soak.txt" | tee -a "$OUT/$what.log" ;;
          kill) "$PY" scripts/soak.py --server-url "localhost:$GRPC_PORT" --minutes 3 --concurrency 16 --kill-after 60 \
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
    traffic-offline)
      # the server's warm-up first (its time is "ready"), then each set, each batch size, two passes
      timeout "${TRAFFIC_OFFLINE_S:-300}" "$PY" benchmark.py --mode offline --random-weights "$ARCH" --nfe "$NFE" \
        --set uniform,mixed --batch-size "${TRAFFIC_BATCH_SIZES:-1,16}" --num-requests "${TRAFFIC_REQUESTS:-32}" \
        --passes 2 --compile --cuda-graphs --server-warmup --output-json "$OUT/traffic-offline.jsonl" 2>&1 \
        | grep -v -E "batch/s|it/s|[Ww]arn" | tee "$OUT/traffic-offline.log" ;;
    traffic-server)
      ckpt=$(mktemp -d)/ckpt
      "$PY" scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" --full-vocoder > /dev/null
      streaming_args=--no-streaming  # with STREAM_CONCURRENCY: f5_tts_streaming on the same server, measured after
      [ -n "${STREAM_CONCURRENCY:-}" ] && streaming_args="--streaming-granularity ${GRANULARITY:-cohort} --streaming-max-streams ${MAX_STREAMS:-32}"
      # shellcheck disable=SC2086  # $streaming_args, $REPO_ARGS: several words
      "$PY" scripts/build_model_repo.py --target "${TARGET:-gpu}" --ckpt-dir "$ckpt" --output "$OUT/repo-traffic" --nfe "$NFE" \
        --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 256 \
        $streaming_args ${REPO_ARGS:-} > /dev/null
      PYTHONPATH=$SERVER_PYTHONPATH "$PY" -m f5_triton.cli serve --model-repo "$OUT/repo-traffic" --http-port "$HTTP_PORT" \
        --grpc-port "$GRPC_PORT" --metrics-port "${METRICS_PORT:-8002}" --log-file "$OUT/tritonserver-traffic.log" \
        > "$OUT/server-traffic.log" 2>&1 &
      server=$!
      wait_ready traffic | tee "$OUT/traffic-server.log"
      grep -E "warm-up|warmed up|covered" "$OUT/tritonserver-traffic.log" | tail -8 | tee -a "$OUT/traffic-server.log"
      command -v nvidia-smi > /dev/null && echo "GPU memory used when ready: $(nvidia-smi --query-gpu=memory.used \
        --format=csv,noheader -i 0)" | tee -a "$OUT/traffic-server.log"
      # no --enable-warmup: the first pass is the first traffic after "ready"
      "$PY" benchmark.py --mode server --server-url "localhost:$GRPC_PORT" --nfe "$NFE" --set uniform,mixed \
        --concurrency "${TRAFFIC_CONCURRENCY:-1,16,64}" --num-requests "${TRAFFIC_SERVER_REQUESTS:-64}" --passes 2 \
        --output-json "$OUT/traffic-server.jsonl" 2>&1 | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/traffic-server.log"
      if [ -n "${STREAM_CONCURRENCY:-}" ]; then  # the streaming model's own first traffic, then f5_tts on its texts
        stream_sets=${STREAM_SETS:-paragraphs}
        "$PY" benchmark.py --mode server --streaming --server-url "localhost:$GRPC_PORT" --nfe "$NFE" \
          --concurrency "$STREAM_CONCURRENCY" --num-requests "${STREAM_REQUESTS:-32}" --passes 2 --set "$stream_sets" \
          --label "${GRANULARITY:-cohort}" --output-json "$OUT/traffic-stream.jsonl" 2>&1 \
          | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/traffic-server.log"
        "$PY" benchmark.py --mode server --server-url "localhost:$GRPC_PORT" --nfe "$NFE" --set "$stream_sets" \
          --concurrency "${COMPARE_CONCURRENCY:-16}" --num-requests "${STREAM_REQUESTS:-32}" --label f5_tts \
          --output-json "$OUT/traffic-stream.jsonl" 2>&1 | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/traffic-server.log"
      fi
      kill -TERM $server; wait $server ;;
    stream_sweep)
      ckpt=$(mktemp -d)/ckpt
      vocoder_flag=--full-vocoder
      [ "${FULL_VOCODER:-1}" = 0 ] && vocoder_flag=
      "$PY" scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" $vocoder_flag
      ports="--http-port ${HTTP_PORT:-8000} --grpc-port ${GRPC_PORT:-8001} --metrics-port ${METRICS_PORT:-8002}"
      compared=0
      for granularity in ${GRANULARITIES:-cohort chunk}; do
        # shellcheck disable=SC2086  # "$PY" and $REPO_ARGS: several words (e.g. REPO_ARGS="--graph-max-rows 2")
        "$PY" scripts/build_model_repo.py --target "${TARGET:-gpu}" --ckpt-dir "$ckpt" --output "$OUT/repo-$granularity" \
          --nfe "$NFE" --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" \
          --max-queue-size 256 --streaming-granularity "$granularity" --streaming-max-streams "${MAX_STREAMS:-32}" ${REPO_ARGS:-} > /dev/null
        # shellcheck disable=SC2086  # $ports: several words
        PYTHONPATH=$SERVER_PYTHONPATH "$PY" -m f5_triton.cli serve --model-repo "$OUT/repo-$granularity" $ports \
          --log-file "$OUT/tritonserver-$granularity.log" > "$OUT/server-$granularity.log" 2>&1 &
        server=$!
        wait_ready "$granularity" | tee -a "$OUT/stream_sweep.log"
        "$PY" benchmark.py --mode server --streaming --server-url "localhost:${GRPC_PORT:-8001}" --nfe "$NFE" \
          --concurrency "${STREAM_CONCURRENCY:-1,4,8,16,32}" --num-requests "${STREAM_REQUESTS:-32}" --passes 2 \
          --label "$granularity" --output-json "$OUT/stream_sweep.jsonl" 2>&1 | grep -v -E "req/s|s/req|[Ww]arn" \
          | tee -a "$OUT/stream_sweep.log"
        if [ "$compared" = 0 ]; then  # the non-streaming model at 16 clients, same server: the throughput target's base
          "$PY" benchmark.py --mode server --server-url "localhost:${GRPC_PORT:-8001}" --nfe "$NFE" --concurrency "${COMPARE_CONCURRENCY:-16}" \
            --num-requests "${STREAM_REQUESTS:-32}" --set paragraphs --enable-warmup --warmup 16 --label f5_tts \
            --output-json "$OUT/stream_sweep.jsonl" 2>&1 | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/stream_sweep.log"
          compared=1
        fi
        kill -TERM $server; wait $server  # not INT: background jobs of a script ignore SIGINT
      done ;;
    stream_rate)
      ckpt=$(mktemp -d)/ckpt
      repo=$(dirname "$ckpt")/repo-rate  # outside $OUT: the device returns a bounded number of files
      vocoder_flag=--full-vocoder
      [ "${FULL_VOCODER:-1}" = 0 ] && vocoder_flag=
      "$PY" scripts/make_random_checkpoint.py --config "$ARCH" --output "$ckpt" $vocoder_flag > /dev/null
      # shellcheck disable=SC2086  # $REPO_ARGS: several words
      "$PY" scripts/build_model_repo.py --target "${TARGET:-gpu}" --ckpt-dir "$ckpt" --output "$repo" --nfe "$NFE" \
        --max-batch-size 16 --preferred-batch-sizes 8,16 --queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 256 \
        --streaming-granularity "${GRANULARITY:-cohort}" --streaming-max-streams "${MAX_STREAMS:-32}" ${REPO_ARGS:-} > /dev/null
      PYTHONPATH=$SERVER_PYTHONPATH "$PY" -m f5_triton.cli serve --model-repo "$repo" --http-port "$HTTP_PORT" \
        --grpc-port "$GRPC_PORT" --metrics-port "${METRICS_PORT:-8002}" --log-file "$OUT/tritonserver-rate.log" \
        > "$OUT/server-rate.log" 2>&1 &
      server=$!
      wait_ready stream_rate | tee "$OUT/stream_rate.log"
      # the first stream after "ready", the same request warm, then warm with a reference the server has not seen
      # (the example clip cut to 4 s: a reference-cache miss), which splits a cold server from a cold reference
      "$PY" -c "import soundfile as sf; a, r = sf.read('examples/basic_ref_en.flac'); sf.write('$OUT/new_ref.wav', a[:4 * r], r)"
      for pass in first-after-ready again new-reference; do
        echo "$pass:" | tee -a "$OUT/stream_rate.log"
        ref=examples/basic_ref_en.flac
        [ "$pass" = new-reference ] && ref=$OUT/new_ref.wav
        "$PY" client_grpc.py --streaming --server-url "localhost:$GRPC_PORT" --reference-audio "$ref" \
          --reference-text "Some call me nature, others call me mother nature." --output-audio "$OUT/first.wav" \
          --target-text "I have been a silent spectator. I watched species evolve, empires rise and fall." 2>&1 \
          | grep -v -i warn | tee -a "$OUT/stream_rate.log"
      done
      rate() {  # rate LABEL SET [ARGS...]: one benchmark.py run, cut at RATE_STEP_S seconds
        local label=$1 set=$2
        shift 2
        timeout "${RATE_STEP_S:-100}" "$PY" benchmark.py --mode server --server-url "localhost:$GRPC_PORT" --nfe "$NFE" \
          --metrics-url "http://localhost:${METRICS_PORT:-8002}/metrics" --set "$set" --num-requests "${RATE_REQUESTS:-32}" \
          --label "$label" "$@" 2>&1 | grep -v -E "req/s|s/req|[Ww]arn" | tee -a "$OUT/stream_rate.log"
      }
      open_loop=(--request-rate "${STREAM_RATES:-2,4,6,8,12,16}" --enable-warmup --warmup 4 --output-json "$OUT/stream_rate.jsonl")
      stream_sets=${STREAM_SETS:-paragraphs,mixed,uniform}
      whole_sets=${RATE_WHOLE_SETS-mixed}
      for set in ${stream_sets//,/ }; do
        rate streamed "$set" --streaming "${open_loop[@]}"
      done
      for set in ${whole_sets//,/ }; do
        rate f5_tts "$set" "${open_loop[@]}"
      done
      RATE_REQUESTS=${RATE_CLOSED_REQUESTS:-64} rate closed mixed --streaming --concurrency "${RATE_CLOSED:-8,16,32,64}" \
        --output-json "$OUT/stream_rate-closed.jsonl"
      [ -n "${RATE_WHOLE_CLOSED-16,32}" ] && RATE_REQUESTS=${RATE_CLOSED_REQUESTS:-64} rate closed-whole mixed \
        --concurrency "${RATE_WHOLE_CLOSED-16,32}" --output-json "$OUT/stream_rate-closed.jsonl"
      "$PY" scripts/plot_results.py "$OUT/stream_rate.jsonl" --output "$OUT/stream_rate.png" \
        --title "open loop, Triton gRPC, $ARCH, NFE $NFE" | tee -a "$OUT/stream_rate.log"
      kill -TERM $server; wait $server ;;
    streaming)
      python3 scripts/streaming_latency.py --random-weights "$ARCH" --device cuda --dtype fp16 --nfe "$NFE" \
        --compile --cuda-graphs ${REF_AUDIO:+--reference-audio "$REF_AUDIO"} --json "$OUT/streaming.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/streaming.log" ;;
  esac
done
