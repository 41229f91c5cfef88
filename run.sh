#!/usr/bin/env bash
# f5-triton: from checkpoint to a running Triton server, in the stages of upstream F5-TTS's
# runtime/triton_trtllm/run.sh (same arguments, same stage numbers).
#
#   bash run.sh <start> <stop> [F5TTS_v1_Base|F5TTS_Base|F5TTS_v1_Small|F5TTS_Small] [options]
#   bash run.sh serve [model] [options]   stages 0-4: get checkpoints, build what is missing, serve
#   bash run.sh test [pytest args]        the test suite (bash scripts/test.sh)
#   bash run.sh stop                      stop the server stage 4 started (background or foreground)
#
# Stages
#   0  checkpoints: download (scripts/download_models.py), or a random one with --random-weights
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
# inputs and was made with the same settings. Relative paths in the variables below are taken
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
#   SERVE_DETACH  1: stage 4 starts the server in the background and returns once it is ready
#   READY_TIMEOUT seconds to wait for the models to load (600)
#   NFE DTYPE MAX_BATCH_SIZE GPUS FLOW_INSTANCES REPO_ARGS   model repository settings (stage 3)
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
case "$RANDOM_WEIGHTS" in 1|true|yes) RANDOM_WEIGHTS=1 ;; *) RANDOM_WEIGHTS=0 ;; esac

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

# Batch sizes for TensorRT engines, which need them up front: the flow-matching batch of the
# rendered repository (MAX_BATCH_SIZE, else the repository's GPU default) and its vocoder batch.
engine_batches() {
  "$PYTHON" -c "import sys; from f5_triton.serving.repository import RepositoryOptions as R
o = R('gpu', '', '', '', max_batch_size=int(sys.argv[1]) or None); print(o.max_batch_size, o.vocoder_max_batch_size)" \
    "${MAX_BATCH_SIZE:-0}"
}

# Engines run only on the GPU model and TensorRT version they were built with: cache them per both.
engine_dir() {
  local key
  if [ -n "${ENGINE_DIR:-}" ]; then user_path "$ENGINE_DIR" ""; return; fi
  key=$("$PYTHON" "$ROOT/scripts/engine_key.py") || die "cannot tell the GPU model for the engine cache (see above)"
  printf '%s' "$ENGINE_ROOT/$LABEL/$key"
}

checkpoint_files() {  # newest official checkpoint (model_<step>.*) or the random one (model.*), and the vocab
  local files=()
  shopt -s nullglob
  files=("$MODEL_DIR"/model_*.safetensors "$MODEL_DIR"/model_*.pt "$MODEL_DIR"/model.safetensors "$MODEL_DIR"/model.pt)
  shopt -u nullglob
  [ ${#files[@]} -gt 0 ] || return 1
  printf '%s\n' "${files[@]}" | sort -V | tail -1
  printf '%s\n' "$MODEL_DIR/vocab.txt"
}

# up_to_date OUTPUT SETTINGS INPUT...: OUTPUT exists, its stamp (OUTPUT.stamp) records SETTINGS and
# nothing among the inputs (files or folders) changed since.
up_to_date() {
  local out=$1 settings=$2 stamp="$1.stamp" input
  shift 2
  [ -e "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$settings" ] || return 1
  for input in "$@"; do
    [ -e "$input" ] || return 1
    if [ -d "$input" ]; then
      [ -z "$(find "$input" -newer "$stamp" -print -quit)" ] || return 1
    else
      [ "$stamp" -nt "$input" ] || return 1
    fi
  done
}

# Serialize builds of one output folder (several pods may share an engine cache volume).
lock_dir() { mkdir -p "$1"; if command -v flock >/dev/null 2>&1; then exec 9>"$1/.lock"; flock 9; fi; }
unlock_dir() { if command -v flock >/dev/null 2>&1; then flock -u 9; exec 9>&-; fi; }

# export_onnx NETWORK: ONNX_DIR/NETWORK$ONNX_SUFFIX.onnx from the checkpoint (fp16 or fp32), written atomically.
export_onnx() {
  local network=$1 out="$ONNX_DIR/$1$ONNX_SUFFIX.onnx" settings="export $1 $ENGINE_PRECISION" tmp file inputs=()
  local fp16_args=()
  [ "$ENGINE_PRECISION" = fp32 ] || fp16_args=(--fp16)
  if [ "$network" = dit_step ]; then
    mapfile -t inputs < <(checkpoint_files)
    [ ${#inputs[@]} -gt 0 ] || die "no checkpoint in $MODEL_DIR; run stage 0"
  else
    inputs=("$(vocoder_folder)") || true
    [ -n "${inputs[0]}" ] || die "no Vocos folder in or beside $MODEL_DIR; run stage 0"
  fi
  lock_dir "$ONNX_DIR"
  if up_to_date "$out" "$settings" "${inputs[@]}"; then
    say "$out is up to date"
  else
    tmp=$(mktemp -d "$ONNX_DIR/.tmp.XXXXXX")
    "$PYTHON" scripts/export_onnx.py --ckpt-dir "$MODEL_DIR" "${ARCH_ARGS[@]}" --output-dir "$tmp" \
      --networks "$network" "${fp16_args[@]}" || { rm -rf "$tmp"; die "ONNX export of $network failed"; }
    # external-data files (if the exporter wrote any) first, the .onnx itself last
    for file in "$tmp"/*; do
      case "${file##*/}" in
        "${out##*/}") ;;
        export_info.json) mv -f "$file" "$ONNX_DIR/export_info.$network.json" ;;
        *) mv -f "$file" "$ONNX_DIR/" ;;
      esac
    done
    mv -f "$tmp/${out##*/}" "$out"
    rm -rf "$tmp"
    printf '%s' "$settings" > "$out.stamp"
    say "wrote $out"
  fi
  unlock_dir
}

# build_engine NETWORK REQUESTS: ENGINE_DIR/NETWORK.plan from its ONNX file, written atomically.
build_engine() {
  local network=$1 requests=$2 dir=$ENGINE_DIR out settings tmp
  out="$dir/$network.plan"
  settings="--max-requests $requests --max-frames $MAX_FRAMES --workspace-gib $TRT_WORKSPACE_GIB"
  [ -z "$ONNX_SUFFIX" ] || settings+=" --onnx-suffix $ONNX_SUFFIX"
  lock_dir "$dir"
  if up_to_date "$out" "$settings" "$ONNX_DIR/$network$ONNX_SUFFIX.onnx"; then
    say "$out is up to date"
  else
    say "building the $network TensorRT engine (minutes; cached in $dir)"
    tmp=$(mktemp -d "$dir/.tmp.XXXXXX")
    # shellcheck disable=SC2086  # settings are words
    "$PYTHON" scripts/build_engines.py --onnx-dir "$ONNX_DIR" --output-dir "$tmp" --networks "$network" \
      --timing-cache "$dir/timing.cache" $settings || { rm -rf "$tmp"; die "TensorRT build of $network failed"; }
    mv -f "$tmp/build_info.json" "$dir/build_info.$network.json"
    mv -f "$tmp/$network.plan" "$out"
    rm -rf "$tmp"
    printf '%s' "$settings" > "$out.stamp"
    say "wrote $out"
  fi
  unlock_dir
}

# The TensorRT flavour that built ENGINE_DIR's vocoder plan (tensorrt | tensorrt-rtx), from its build info.
plan_flavour() {
  local info="$ENGINE_DIR/build_info.vocoder.json"
  if [ -f "$info" ]; then
    "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['vocoder']['flavour'])" "$info"
  else printf '%s' tensorrt; fi
}

vocoder_folder() {
  local candidate
  for candidate in "$MODEL_DIR/vocos" "$MODEL_DIR/../vocos-mel-24khz" "$MODEL_DIR/vocos-mel-24khz"; do
    if [ -d "$candidate" ]; then (cd "$candidate" && pwd); return; fi
  done
  return 1
}

find_ref_audio() {  # REF_AUDIO, else the clip shipped in examples/ (REF_TEXT's default is its transcript)
  local ref
  ref=$(user_path "${REF_AUDIO:-}" "$ROOT/examples/basic_ref_en.flac")
  [ -f "$ref" ] || die "no reference clip at $ref: set REF_AUDIO to a 3-15 s clip and REF_TEXT to its transcript"
  printf '%s' "$ref"
}

server_pid() {  # the pid of the server stage 4 started (background or foreground), if it still runs
  local pid
  [ -f "$PID_FILE" ] || return 1
  pid=$(cat "$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # a stale file's pid may have been reused by another program
  if [ -r "/proc/$pid/cmdline" ]; then tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "f5_triton.cli serve" || return 1; fi
  printf '%s' "$pid"
}

stop_server() {
  local pid child waited=0
  if ! pid=$(server_pid); then say "no server running (pid file $PID_FILE)"; rm -f "$PID_FILE" "$SERVED_FILE"; return 0; fi
  say "stopping the server (pid $pid): in-flight requests finish first"
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; waited=$((waited + 1))
    if [ "$waited" -ge 90 ]; then
      say "still running after ${waited}s, killing it"
      # tritonserver runs in its own process group (a child of f5-triton serve): kill that group too
      for child in $(pgrep -P "$pid" 2>/dev/null || true); do kill -KILL -- "-$child" 2>/dev/null || true; done
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
  done
  rm -f "$PID_FILE" "$SERVED_FILE"
  say "server stopped"
}

if [ "$COMMAND" = stop ]; then stop_server; exit 0; fi

# Client tests alone (stages 5-6) with no model named talk to the running server: name what it serves.
if [ "$START" -ge 5 ] && [ -z "$MODEL_GIVEN" ] && [ "$RANDOM_WEIGHTS" = 0 ] && server_pid >/dev/null \
    && [ -f "$SERVED_FILE" ]; then
  read -r LABEL RANDOM_WEIGHTS < "$SERVED_FILE"
  [ "$RANDOM_WEIGHTS" = 1 ] || MODEL=$LABEL
fi

# The interpreter: PYTHON, else this checkout's .venv, else a python3 that has the package (as in the
# container image); on a fresh checkout, create .venv first (scripts/setup_env.sh: needs PyPI).
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
  elif python3 -c "import torch, tritonclient, f5_triton.serving.repository" >/dev/null 2>&1; then PYTHON=python3
  else
    say "no Python environment with f5-triton yet: creating .venv (bash scripts/setup_env.sh, a few minutes)"
    bash "$ROOT/scripts/setup_env.sh" || die "could not create .venv; install the package yourself (pip install -e '.[onnx,serve,gateway]') and set PYTHON"
    PYTHON=$ROOT/.venv/bin/python
  fi
fi

have_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then return 0; fi
  [ -e /etc/nv_tegra_release ]  # Jetson: nvidia-smi may be missing, the iGPU is there
}

if [ "$BACKEND" = auto ]; then
  if have_gpu && "$PYTHON" -c "import sys; from f5_triton.engines.tensorrt_engine import runs_here
sys.exit(not runs_here())" >/dev/null 2>&1; then BACKEND=trt
  else BACKEND=torch; fi
fi
# Plans take their precision from the ONNX file they are built from: the fp16 export unless DTYPE=fp32.
if [ "${DTYPE:-}" = fp32 ]; then ENGINE_PRECISION=fp32 ONNX_SUFFIX=""; else ENGINE_PRECISION=fp16 ONNX_SUFFIX=.fp16; fi
if [ -z "$TARGET" ]; then
  if [ "$BACKEND" = trt ] || have_gpu; then TARGET=gpu; else TARGET=cpu; fi
fi
[ "$BACKEND" != trt ] || [ "$TARGET" = gpu ] || die "the trt backend runs on a GPU; use --backend torch for --target cpu"

# The architecture comes from model.yaml beside a checkpoint (random ones have it), else from the name.
ARCH_ARGS=()
if [ "$RANDOM_WEIGHTS" = 0 ]; then
  "$PYTHON" -c "import sys; from f5_triton.config import ARCHITECTURES as A; sys.exit(sys.argv[1] not in A)" "$MODEL" \
    || die "unknown model '$MODEL': F5TTS_v1_Base, F5TTS_Base, F5TTS_v1_Small or F5TTS_Small"
  [ -f "$MODEL_DIR/model.yaml" ] || ARCH_ARGS=(--arch "$MODEL")
fi

run_stage() { [ "$START" -le "$1" ] && [ "$STOP" -ge "$1" ]; }

say "stages $START-$STOP, model $LABEL, backend $BACKEND, target $TARGET"
if [ "$TARGET" = gpu ] && { { [ "$BACKEND" = trt ] && { run_stage 1 || run_stage 2 || run_stage 3; }; } || run_stage 7; }; then
  ENGINE_DIR=$(engine_dir)
  batches=$(engine_batches)
  read -r FLOW_BATCH VOCODER_BATCH <<< "$batches"
fi
[ "$RANDOM_WEIGHTS" = 0 ] || printf '%s\n' "$RANDOM_BANNER"

# ---------------------------------------------------------------------------------------------
# 0: checkpoints

if run_stage 0; then
  if checkpoint_files >/dev/null && [ -f "$MODEL_DIR/vocab.txt" ] && vocoder_folder >/dev/null; then
    say "stage 0: checkpoint found in $MODEL_DIR"
  elif [ "$RANDOM_WEIGHTS" = 1 ]; then
    say "stage 0: writing a random '$RANDOM_ARCH' checkpoint to $MODEL_DIR (NOT speech)"
    "$PYTHON" scripts/make_random_checkpoint.py --config "$RANDOM_ARCH" --output "$MODEL_DIR"
  else
    [ "$MODEL_DIR" = "$CKPT_DIR/$MODEL" ] || die "MODEL_DIR=$MODEL_DIR holds no checkpoint (model_*.safetensors|pt, vocab.txt, Vocos)"
    if ! { [ -d "$CKPT_DIR" ] && [ -w "$CKPT_DIR" ]; } && ! { [ ! -e "$CKPT_DIR" ] && [ -w "$(dirname "$CKPT_DIR")" ]; }; then
      die "no checkpoint in $MODEL_DIR, and $CKPT_DIR is not writable (a read-only mount?): nothing can be
  downloaded there. Download first (Docker: docker compose --profile download run --rm download),
  or mount it writable, or point MODEL_DIR at a folder with the checkpoint"
    fi
    say "stage 0: downloading $MODEL and Vocos into $CKPT_DIR"
    "$PYTHON" scripts/download_models.py --model "$MODEL" --output "$CKPT_DIR" || die "no checkpoint for $MODEL.
  Without network, put the published files in place and run again:
    $CKPT_DIR/$MODEL/model_<step>.safetensors and vocab.txt   (huggingface.co/SWivid/F5-TTS)
    $CKPT_DIR/vocos-mel-24khz/config.yaml and pytorch_model.bin (huggingface.co/charactr/vocos-mel-24khz)
  or point MODEL_DIR at a folder that has them (Vocos in MODEL_DIR/vocos/ or beside it).
  To try the whole path without any download: bash run.sh serve --random-weights (output is noise, not speech)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 1-2: TensorRT engines (GPU-specific: built on the serving GPU, cached per GPU model)

if run_stage 1; then
  if [ "$BACKEND" = trt ]; then
    say "stage 1: DiT ONNX + TensorRT engine"
    export_onnx dit_step
    build_engine dit_step "$FLOW_BATCH"
  else
    say "stage 1: skipped (backend $BACKEND needs no engine)"
  fi
fi

if run_stage 2; then
  if [ "$BACKEND" = trt ]; then
    say "stage 2: vocoder ONNX + TensorRT engine"
    export_onnx vocoder
    build_engine vocoder "$VOCODER_BATCH"
  else
    say "stage 2: skipped (backend $BACKEND needs no engine)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 3: model repository

if run_stage 3; then
  mapfile -t ckpt_inputs < <(checkpoint_files) || true
  [ ${#ckpt_inputs[@]} -gt 0 ] || die "no checkpoint in $MODEL_DIR; run stage 0 (bash run.sh 0 0 $MODEL)"
  repo_args=(--ckpt-dir "$MODEL_DIR" "${ARCH_ARGS[@]}")
  inputs=("${ckpt_inputs[@]}" "$ROOT/model_repo" "$ROOT/f5_triton/serving/repository.py")
  if [ "$BACKEND" = trt ] && [ "$(plan_flavour)" = tensorrt-rtx ]; then
    # Triton's TensorRT backend (the image's libnvinfer) cannot load TensorRT-RTX plans: both run in python models
    repo_args+=(--target gpu --max-batch-size "$FLOW_BATCH" --dit-engine tensorrt
                --dit-engine-path "$ENGINE_DIR/dit_step.plan" --vocoder-engine tensorrt
                --vocoder-engine-path "$ENGINE_DIR/vocoder.plan")
    inputs+=("$ENGINE_DIR/dit_step.plan" "$ENGINE_DIR/vocoder.plan")
  elif [ "$BACKEND" = trt ]; then
    repo_args+=(--target trt --max-batch-size "$FLOW_BATCH" --dit-engine-path "$ENGINE_DIR/dit_step.plan"
                --vocoder-plan "$ENGINE_DIR/vocoder.plan")
    inputs+=("$ENGINE_DIR/dit_step.plan" "$ENGINE_DIR/vocoder.plan")
  else
    repo_args+=(--target "$TARGET")
    [ -z "${MAX_BATCH_SIZE:-}" ] || repo_args+=(--max-batch-size "$MAX_BATCH_SIZE")
  fi
  [ -z "${NFE:-}" ] || repo_args+=(--nfe "$NFE")
  [ -z "${DTYPE:-}" ] || repo_args+=(--dtype "$DTYPE")
  [ -z "${GPUS:-}" ] || repo_args+=(--gpus "$GPUS")
  [ -z "${FLOW_INSTANCES:-}" ] || repo_args+=(--flow-instances "$FLOW_INSTANCES")
  # shellcheck disable=SC2206  # REPO_ARGS: extra build_model_repo.py arguments, split on spaces
  [ -z "${REPO_ARGS:-}" ] || repo_args+=(${REPO_ARGS})
  if up_to_date "$MODEL_REPO" "${repo_args[*]}" "${inputs[@]}"; then
    say "stage 3: $MODEL_REPO is up to date"
  else
    say "stage 3: rendering the model repository at $MODEL_REPO"
    mkdir -p "$(dirname "$MODEL_REPO")"
    rm -f "$MODEL_REPO.stamp"
    "$PYTHON" scripts/build_model_repo.py --output "$MODEL_REPO" "${repo_args[@]}"
    printf '%s' "${repo_args[*]}" > "$MODEL_REPO.stamp"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 4: server

if run_stage 4; then
  [ -d "$MODEL_REPO" ] || die "no model repository at $MODEL_REPO; run stage 3 first"
  mkdir -p "$LOG_DIR" "$(dirname "$TRITON_LOG")" "$(dirname "$SERVER_LOG")" "$(dirname "$PID_FILE")"
  serve=("$PYTHON" -m f5_triton.cli serve --model-repo "$MODEL_REPO" --http-port "$HTTP_PORT"
         --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --log-file "$TRITON_LOG"
         --ready-timeout "$READY_TIMEOUT")
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
    printf '%s %s\n' "$LABEL" "$RANDOM_WEIGHTS" > "$SERVED_FILE"
    if [ "$detach" != 1 ]; then  # foreground: signals (Ctrl-C, docker stop) reach the server; `stop` too
      echo "$$" > "$PID_FILE"
      exec "${serve[@]}"
    fi
    : > "$SERVER_LOG"
    [ "$RANDOM_WEIGHTS" = 0 ] || printf '%s\n' "$RANDOM_BANNER" >> "$SERVER_LOG"
    if command -v setsid >/dev/null 2>&1; then starter=(setsid); else starter=(nohup); fi
    "${starter[@]}" "${serve[@]}" >> "$SERVER_LOG" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    waited=0
    until grep -q "f5-triton: server ready" "$SERVER_LOG"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$PID_FILE"
        tail -n 40 "$SERVER_LOG" >&2
        die "the server exited before it was ready (logs: $SERVER_LOG, $TRITON_LOG)"
      fi
      if [ "$waited" -ge "$READY_TIMEOUT" ]; then
        tail -n 40 "$SERVER_LOG" >&2
        die "server not ready after ${READY_TIMEOUT}s; it is still running (pid $pid): bash run.sh stop"
      fi
      sleep 1; waited=$((waited + 1))
    done
    say "stage 4: server ready in the background (pid $pid in $PID_FILE; stop it with: bash run.sh stop)"
    say "  http=$SERVER_HOST:$HTTP_PORT grpc=$SERVER_HOST:$GRPC_PORT metrics=http://$SERVER_HOST:$METRICS_PORT/metrics"
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
