#!/usr/bin/env bash
# f5-triton: from checkpoint to a running Triton server, in the stages of upstream F5-TTS's
# runtime/triton_trtllm/run.sh (same arguments, same stage numbers).
#
#   bash run.sh <start> <stop> [F5TTS_v1_Base|F5TTS_Base|F5TTS_v1_Small|F5TTS_Small] [options]
#   bash run.sh serve [model] [options]   stages 0-4: get checkpoints, build what is missing, serve
#   bash run.sh test [pytest args]        the test suite (bash scripts/test.sh)
#   bash run.sh stop                      stop the server stage 4 started (background or foreground)
#
# run.sh picks the stages; each is an f5-triton command of the package: `f5-triton build checkpoint|dit|
# vocoder|repository` (stages 0-3, f5_triton/build.py), `f5-triton serve` (4), `f5-triton stop`.
#
# Stages
#   0  checkpoints: download (f5-triton build checkpoint), or a random one with --random-weights
#   1  DiT: export ONNX, build the TensorRT engine           (trt backend only)
#   2  vocoder: export ONNX, build the TensorRT engine       (trt backend only)
#      Strongly typed builds: fp16 plans from the fp16 ONNX export (fp32 with DTYPE=fp32). TensorRT
#      (10.x/11.x) when it imports, else TensorRT-RTX (pip install tensorrt-rtx), whose builder needs
#      no GPU: `bash run.sh 1 2 --backend trt` builds its portable plans on any machine.
#   3  render the Triton model repository (scripts/build_model_repo.py)
#   4  start the server (f5-triton serve); in the background when the stop stage is > 4
#   5  gRPC client test (client_grpc.py)          6  HTTP client test (client_http.py)
#   7  offline benchmark with TensorRT engines     8  offline benchmark with PyTorch (benchmark.py)
#
# Options
#   --backend torch|trt   trt: TensorRT engines (GPU); torch: PyTorch on GPU or CPU.
#                         Default: trt when a GPU and a TensorRT that runs on it are present.
#   --target cpu|gpu      torch backend: where it runs (default: gpu when nvidia-smi sees one)
#   --random-weights      a tiny random checkpoint: runs the whole path offline, output is NOT speech
#
# Finished artifacts are reused: a step is skipped when its output exists, is newer than its
# inputs and was made with the same settings (a stamp beside it; builds of one folder hold its lock). Relative paths in the variables below are taken
# from the directory run.sh is called from; the defaults live in this checkout.
#   CKPT_DIR      checkpoints (ckpts)              MODEL_DIR    one model's folder ($CKPT_DIR/<model>)
#   BUILD_DIR     everything built (build):        ONNX_DIR     $BUILD_DIR/onnx/<model>
#   ENGINE_ROOT   $BUILD_DIR/engines               ENGINE_DIR   $ENGINE_ROOT/<model>/<GPU model>-<TensorRT>
#   MODEL_REPO    rendered repository ($BUILD_DIR/model_repo)
#   LOG_DIR       $BUILD_DIR/logs: server.log (f5-triton serve), tritonserver.log, server.pid and
#                 server.model (the model it serves; stages 5-6 use it when no model is given)
#                 (SERVER_LOG, TRITON_LOG, PID_FILE name them one by one)
#   OUT_DIR       client outputs, benchmark results (out)
#   F5_MODEL      model when none is given (F5TTS_v1_Base); RANDOM_WEIGHTS=1 is --random-weights
#   HTTP_PORT GRPC_PORT METRICS_PORT  (8000 8001 8002)     SERVER_HOST (localhost, for the clients)
#   F5_TRITON_HOST  address Triton's ports listen on (127.0.0.1); 0.0.0.0: all interfaces (set F5_TRITON_ADMIN_KEY)
#   SERVE_DETACH  1 (or true/yes/on): stage 4 starts the server in the background and returns once it is ready
#   READY_TIMEOUT seconds to wait for the models to load (600)
#   NFE DTYPE MAX_BATCH_SIZE GPUS FLOW_INSTANCES REPO_ARGS   model repository settings (stage 3); GPUS: ids (0,1)
#                 or `visible`, every GPU nvidia-smi lists (compose reserves the GPUs, the container sees them from 0)
#   MAX_FRAMES TRT_WORKSPACE_GIB                             engine settings (stages 1-2)
#   F5_TENSORRT   tensorrt | tensorrt-rtx: the TensorRT flavour for builds and engines (default: auto)
#   REF_AUDIO REF_TEXT TARGET_TEXT                           client tests (stages 5-6; examples/basic_ref_en.flac)
#   BENCH_BATCH_SIZE BENCH_ARGS                              benchmarks (stages 7-8)
#   PYTHON        interpreter (default: .venv/bin/python, made by scripts/setup_env.sh if missing)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CALLER_PWD=$PWD
cd "$ROOT"

say() { printf '%s\n' "run.sh: $*"; }
die() { printf '%s\n' "run.sh: error: $*" >&2; exit 1; }
# as_bool NAME VALUE: 1 or 0 for the words of f5_triton.config.parse_bool (true/1/yes/on, false/0/no/off or empty,
# any case), as RANDOM_WEIGHTS and SERVE_DETACH are read; anything else is an error naming the variable.
as_bool() {
  case "$(printf '%s' "$2" | tr '[:upper:]' '[:lower:]')" in
    1|true|yes|on) printf 1 ;;
    0|false|no|off|"") printf 0 ;;
    *) printf '%s\n' "run.sh: error: $1 must be true or false (1/yes/on or 0/no/off), got '$2'" >&2; return 1 ;;
  esac
}

usage() {
  sed -n '2,/^set -euo/p' "$ROOT/run.sh" | sed '$d' | sed 's/^# \{0,1\}//'
}

# A user-given path is relative to where run.sh was called from; a default is inside the checkout.
user_path() {  # user_path VALUE DEFAULT
  local value=${1:-} default=$2
  if [ -z "$value" ]; then printf '%s' "$default"
  elif [[ $value = /* ]]; then printf '%s' "$value"
  else printf '%s' "$CALLER_PWD/$value"; fi
}

# ---------------------------------------------------------------------------------------------
# Arguments

COMMAND=stages
START="" STOP="" MODEL="" BACKEND=${BACKEND:-auto} TARGET=${TARGET:-} RANDOM_WEIGHTS=${RANDOM_WEIGHTS:-0}
POSITIONAL=()
case "${1:-}" in
  serve) COMMAND=serve; shift ;;
  test) shift; exec bash "$ROOT/scripts/test.sh" "$@" ;;
  stop) COMMAND=stop; shift ;;
  -h|--help|help|"") usage; exit 0 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND=${2:?--backend needs torch or trt}; shift 2 ;;
    --backend=*) BACKEND=${1#*=}; shift ;;
    --target) TARGET=${2:?--target needs cpu or gpu}; shift 2 ;;
    --target=*) TARGET=${1#*=}; shift ;;
    --random-weights) RANDOM_WEIGHTS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see bash run.sh --help)" ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
if [ "$COMMAND" = stages ]; then
  [ ${#POSITIONAL[@]} -ge 2 ] || die "give a start and a stop stage, e.g. bash run.sh 0 4 F5TTS_v1_Base"
  START=${POSITIONAL[0]} STOP=${POSITIONAL[1]} MODEL=${POSITIONAL[2]:-}
  [ ${#POSITIONAL[@]} -le 3 ] || die "too many arguments: ${POSITIONAL[*]:3}"
  [[ $START =~ ^[0-9]+$ && $STOP =~ ^[0-9]+$ ]] || die "stages are numbers 0-8, got '$START' '$STOP'"
elif [ "$COMMAND" = serve ]; then
  START=0 STOP=4 MODEL=${POSITIONAL[0]:-}
  [ ${#POSITIONAL[@]} -le 1 ] || die "serve takes at most a model name, got: ${POSITIONAL[*]}"
fi
MODEL_GIVEN=${MODEL:-${F5_MODEL:-}}
MODEL=${MODEL:-${F5_MODEL:-F5TTS_v1_Base}}
case "$BACKEND" in auto|torch|trt) ;; pytorch) BACKEND=torch ;; *) die "--backend must be torch or trt, got '$BACKEND'" ;; esac
case "$TARGET" in ""|cpu|gpu) ;; *) die "--target must be cpu or gpu, got '$TARGET'" ;; esac
RANDOM_WEIGHTS=$(as_bool RANDOM_WEIGHTS "$RANDOM_WEIGHTS") || exit 1
if [ -n "${SERVE_DETACH:-}" ]; then SERVE_DETACH=$(as_bool SERVE_DETACH "$SERVE_DETACH") || exit 1; fi
F5_TRITON_HOST=${F5_TRITON_HOST:-127.0.0.1}

# ---------------------------------------------------------------------------------------------
# Paths and settings

RANDOM_ARCH=tiny
if [ "$RANDOM_WEIGHTS" = 1 ]; then LABEL=random-$RANDOM_ARCH; else LABEL=$MODEL; fi
CKPT_DIR=$(user_path "${CKPT_DIR:-}" "$ROOT/ckpts")
MODEL_DIR=$(user_path "${MODEL_DIR:-}" "$CKPT_DIR/$LABEL")
BUILD_DIR=$(user_path "${BUILD_DIR:-}" "$ROOT/build")
ONNX_DIR=$(user_path "${ONNX_DIR:-}" "$BUILD_DIR/onnx/$LABEL")
ENGINE_ROOT=$(user_path "${ENGINE_ROOT:-}" "$BUILD_DIR/engines")
MODEL_REPO=$(user_path "${MODEL_REPO:-}" "$BUILD_DIR/model_repo")
OUT_DIR=$(user_path "${OUT_DIR:-}" "$ROOT/out")
LOG_DIR=$(user_path "${LOG_DIR:-}" "$BUILD_DIR/logs")
PID_FILE=$(user_path "${PID_FILE:-}" "$LOG_DIR/server.pid")
SERVED_FILE=${PID_FILE%.pid}.model
SERVER_LOG=$(user_path "${SERVER_LOG:-}" "$LOG_DIR/server.log")
TRITON_LOG=$(user_path "${TRITON_LOG:-}" "$LOG_DIR/tritonserver.log")
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}
SERVER_HOST=${SERVER_HOST:-localhost}
READY_TIMEOUT=${READY_TIMEOUT:-600}
MAX_FRAMES=${MAX_FRAMES:-4096} TRT_WORKSPACE_GIB=${TRT_WORKSPACE_GIB:-4}
REF_TEXT=${REF_TEXT:-"Some call me nature, others call me mother nature."}
TARGET_TEXT=${TARGET_TEXT:-"I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring."}

[ "$MODEL_REPO" != "$ROOT/model_repo" ] || die "MODEL_REPO must not be $ROOT/model_repo: that folder holds the templates"

RANDOM_BANNER="
################################################################################
##  RANDOM WEIGHTS: this server runs a random '$RANDOM_ARCH' checkpoint.
##  Its output is NOISE, NOT SPEECH. It only shows that the whole path works.
##  For real speech: bash run.sh serve $MODEL   (needs the published checkpoint)
################################################################################"

f5() { "$PYTHON" -m f5_triton.cli "$@"; }  # the f5-triton command of this environment

find_ref_audio() {  # REF_AUDIO, else the clip shipped in examples/ (REF_TEXT's default is its transcript)
  local ref
  ref=$(user_path "${REF_AUDIO:-}" "$ROOT/examples/basic_ref_en.flac")
  [ -f "$ref" ] || die "no reference clip at $ref: set REF_AUDIO to a 3-15 s clip and REF_TEXT to its transcript"
  printf '%s' "$ref"
}

server_pid() {  # the pid of the server stage 4 started (background or foreground), if it still runs
  f5 status --pid-file "$PID_FILE" 2>/dev/null
}

# The interpreter: PYTHON, else this checkout's .venv, else a python3 that has the package (as in the
# container image); on a fresh checkout, create .venv first (scripts/setup_env.sh: needs PyPI).
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
  elif python3 -c "import torch, tritonclient, f5_triton.repository" >/dev/null 2>&1; then PYTHON=python3
  elif [ "$COMMAND" = stop ]; then die "no Python environment with f5-triton (set PYTHON): no server of this checkout runs"
  else
    say "no Python environment with f5-triton yet: creating .venv (bash scripts/setup_env.sh, a few minutes)"
    bash "$ROOT/scripts/setup_env.sh" || die "could not create .venv; install the package yourself (pip install -e '.[onnx,serve,gateway]') and set PYTHON"
    PYTHON=$ROOT/.venv/bin/python
  fi
fi

if [ "$COMMAND" = stop ]; then f5 stop --pid-file "$PID_FILE"; exit; fi

# Client tests alone (stages 5-6) with no model named talk to the running server: name what it serves.
if [ "$START" -ge 5 ] && [ -z "$MODEL_GIVEN" ] && [ "$RANDOM_WEIGHTS" = 0 ] && server_pid >/dev/null \
    && [ -f "$SERVED_FILE" ]; then
  read -r LABEL RANDOM_WEIGHTS < "$SERVED_FILE"
  [ "$RANDOM_WEIGHTS" = 1 ] || MODEL=$LABEL
fi

# Backend and target: given, or what this machine runs (trt when a GPU and a TensorRT that runs on it are
# present). The architecture comes from model.yaml beside a checkpoint (random ones have it), else from the name.
ARCH_ARGS=()
model_check=()
if [ "$RANDOM_WEIGHTS" = 0 ]; then
  model_check=(--model "$MODEL")
  [ -f "$MODEL_DIR/model.yaml" ] || ARCH_ARGS=(--arch "$MODEL")
fi
chosen=$(f5 build backend --backend "$BACKEND" --target "$TARGET" "${model_check[@]}") || exit 1
read -r BACKEND TARGET <<< "$chosen"

run_stage() { [ "$START" -le "$1" ] && [ "$STOP" -ge "$1" ]; }

say "stages $START-$STOP, model $LABEL, backend $BACKEND, target $TARGET"
if [ "$TARGET" = gpu ] && { { [ "$BACKEND" = trt ] && { run_stage 1 || run_stage 2 || run_stage 3; }; } || run_stage 7; }; then
  # Engines run only on the GPU model and TensorRT version they were built with: cached per both.
  if [ -n "${ENGINE_DIR:-}" ]; then ENGINE_DIR=$(user_path "$ENGINE_DIR" "")
  else ENGINE_DIR=$(f5 build engine-dir --engine-root "$ENGINE_ROOT" --label "$LABEL") || exit 1; fi
fi
[ "$RANDOM_WEIGHTS" = 0 ] || printf '%s\n' "$RANDOM_BANNER"

# What stages 1-3 are built from and with (f5-triton build: each output is remade only when stale).
build_args=(--model-dir "$MODEL_DIR" "${ARCH_ARGS[@]}")
[ -z "${MAX_BATCH_SIZE:-}" ] || build_args+=(--max-batch-size "$MAX_BATCH_SIZE")
[ -z "${DTYPE:-}" ] || build_args+=(--dtype "$DTYPE")

# ---------------------------------------------------------------------------------------------
# 0: checkpoints

if run_stage 0; then
  say "stage 0: checkpoint"
  random_args=()
  [ "$RANDOM_WEIGHTS" = 0 ] || random_args=(--random-weights)
  f5 build checkpoint --model "$MODEL" --ckpt-dir "$CKPT_DIR" --model-dir "$MODEL_DIR" "${random_args[@]}" || exit 1
fi

# ---------------------------------------------------------------------------------------------
# 1-2: TensorRT engines (GPU-specific: built on the serving GPU, cached per GPU model)

engine_stage() {  # engine_stage STAGE NETWORK
  if [ "$BACKEND" != trt ]; then say "stage $1: skipped (backend $BACKEND needs no engine)"; return; fi
  say "stage $1: $2 ONNX + TensorRT engine"
  f5 build "$2" "${build_args[@]}" --onnx-dir "$ONNX_DIR" --engine-dir "$ENGINE_DIR" --max-frames "$MAX_FRAMES" \
    --workspace-gib "$TRT_WORKSPACE_GIB" || exit 1
}

if run_stage 1; then engine_stage 1 dit; fi
if run_stage 2; then engine_stage 2 vocoder; fi

# ---------------------------------------------------------------------------------------------
# 3: model repository

if run_stage 3; then
  say "stage 3: model repository"
  repo_args=(--output "$MODEL_REPO" --backend "$BACKEND" --target "$TARGET" --repo-args="${REPO_ARGS:-}")
  [ "$BACKEND" != trt ] || repo_args+=(--engine-dir "$ENGINE_DIR")
  [ -z "${NFE:-}" ] || repo_args+=(--nfe "$NFE")
  if [ "${GPUS:-}" = visible ]; then  # every GPU this process sees (in a container: those reserved for it)
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -) && [ -n "$GPUS" ] \
      || die "GPUS=visible, but nvidia-smi lists no GPU"
  fi
  [ -z "${GPUS:-}" ] || repo_args+=(--gpus "$GPUS")
  [ -z "${FLOW_INSTANCES:-}" ] || repo_args+=(--flow-instances "$FLOW_INSTANCES")
  f5 build repository "${build_args[@]}" "${repo_args[@]}" || exit 1
fi

# ---------------------------------------------------------------------------------------------
# 4: server

if run_stage 4; then
  [ -d "$MODEL_REPO" ] || die "no model repository at $MODEL_REPO; run stage 3 first"
  mkdir -p "$LOG_DIR" "$(dirname "$TRITON_LOG")" "$(dirname "$SERVER_LOG")"
  serve=(serve --model-repo "$MODEL_REPO" --host "$F5_TRITON_HOST" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT"
         --metrics-port "$METRICS_PORT" --log-file "$TRITON_LOG" --ready-timeout "$READY_TIMEOUT" --pid-file "$PID_FILE")
  # Later stages need the prompt back: then the server goes to the background unless told otherwise.
  if [ -n "${SERVE_DETACH:-}" ]; then detach=$SERVE_DETACH
  elif [ "$STOP" -gt 4 ]; then detach=1
  else detach=0; fi
  if pid=$(server_pid); then
    [ "$detach" = 1 ] || die "a server is already running (pid $pid); bash run.sh stop"
    say "stage 4: server already running in the background (pid $pid), reused"
  else
    [ ! -f "$TRITON_LOG" ] || mv -f "$TRITON_LOG" "$TRITON_LOG.1"
    {
      date -u +"%Y-%m-%dT%H:%M:%SZ f5-triton: model $LABEL, backend $BACKEND, target $TARGET, repository $MODEL_REPO"
      [ "$RANDOM_WEIGHTS" = 0 ] || printf '%s\n' "$RANDOM_BANNER"
    } > "$TRITON_LOG"
    say "stage 4: starting the server (tritonserver log: $TRITON_LOG)"
    mkdir -p "$(dirname "$PID_FILE")"
    printf '%s %s\n' "$LABEL" "$RANDOM_WEIGHTS" > "$SERVED_FILE"
    # foreground: signals (Ctrl-C, docker stop) and `bash run.sh stop` reach f5-triton serve itself
    [ "$detach" = 1 ] || exec "$PYTHON" -m f5_triton.cli "${serve[@]}"
    : > "$SERVER_LOG"
    [ "$RANDOM_WEIGHTS" = 0 ] || printf '%s\n' "$RANDOM_BANNER" >> "$SERVER_LOG"
    f5 "${serve[@]}" --detach "$SERVER_LOG" \
      || die "no server ready (logs: $SERVER_LOG, $TRITON_LOG; if it still runs: bash run.sh stop)"
    say "stage 4: server ready in the background ($PID_FILE; stop it with: bash run.sh stop)"
    say "  $(grep -o 'http=.*' "$SERVER_LOG" | tail -n 1)"  # f5-triton serve's URLs and the address it listens on
  fi
fi

# ---------------------------------------------------------------------------------------------
# 5-6: client tests

client_test() {  # client_test PROTOCOL PORT
  local protocol=$1 port=$2 ref out
  ref=$(find_ref_audio)
  out="$OUT_DIR/client_${protocol}_$LABEL.wav"
  mkdir -p "$OUT_DIR"
  "$PYTHON" "client_$protocol.py" --server-url "$SERVER_HOST:$port" --reference-audio "$ref" \
    --reference-text "$REF_TEXT" --target-text "$TARGET_TEXT" --output-audio "$out"
  [ "$RANDOM_WEIGHTS" = 0 ] || say "$out holds NOISE, NOT SPEECH (random weights)"
}

if run_stage 5; then say "stage 5: gRPC client test"; client_test grpc "$GRPC_PORT"; fi
if run_stage 6; then say "stage 6: HTTP client test"; client_test http "$HTTP_PORT"; fi

# ---------------------------------------------------------------------------------------------
# 7-8: offline benchmarks (in process, no server)

benchmark() {  # benchmark KIND BATCH EXTRA...
  local kind=$1 batch=$2 ref
  shift 2
  ref=$(find_ref_audio)
  mkdir -p "$OUT_DIR"
  # shellcheck disable=SC2086  # BENCH_ARGS: extra benchmark.py arguments, split on spaces
  "$PYTHON" benchmark.py --mode offline --ckpt-dir "$MODEL_DIR" "${ARCH_ARGS[@]}" --batch-size "$batch" --enable-warmup \
    --reference-audio "$ref" --label "$LABEL-$kind" \
    --output-json "$OUT_DIR/benchmark_${LABEL}_batch_size_${batch}_$kind.jsonl" "$@" ${BENCH_ARGS:-}
}

if run_stage 7; then
  say "stage 7: offline benchmark, TensorRT engines"
  [ "$TARGET" = gpu ] || die "stage 7 runs TensorRT engines: it needs a GPU (stage 8 runs PyTorch anywhere)"
  [ -f "$ENGINE_DIR/dit_step.plan" ] && [ -f "$ENGINE_DIR/vocoder.plan" ] \
    || die "no engines in $ENGINE_DIR; run stages 1-2 (--backend trt)"
  benchmark trt "${BENCH_BATCH_SIZE:-2}" --backend-type trt --dit-engine-path "$ENGINE_DIR/dit_step.plan" \
    --vocoder-engine tensorrt --vocoder-engine-path "$ENGINE_DIR/vocoder.plan"
fi

if run_stage 8; then
  say "stage 8: offline benchmark, PyTorch"
  if [ "$TARGET" = gpu ]; then device=cuda; else device=cpu; fi
  benchmark pytorch "${BENCH_BATCH_SIZE:-1}" --backend-type torch --device "$device"
fi
