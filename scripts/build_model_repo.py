#!/usr/bin/env python3
"""Render a ready Triton model repository for a target (cpu, gpu or trt).

    python scripts/build_model_repo.py --target cpu --ckpt-dir ckpts/tiny --output model_repo_cpu
    python scripts/build_model_repo.py --target trt --ckpt-dir ckpts/F5TTS_v1_Base \
        --dit-engine-path engines/dit_step.plan --vocoder-plan engines/vocoder.plan --output repo
"""

import argparse
import sys

from f5_triton.cli import add_model_args, resolve_model_paths
from f5_triton.config import DEFAULT_SAMPLING, DTYPES
from f5_triton.errors import CheckpointError, InvalidInputError
from f5_triton.serving.repository import TARGETS, RepositoryOptions, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=TARGETS)
    parser.add_argument("--output", required=True, help="repository folder to write (replaced)")
    add_model_args(parser)
    parser.add_argument("--nfe", type=int, default=DEFAULT_SAMPLING.nfe_steps,
                        help="default ODE steps when a request sends none")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="GPU precision (default fp16)")
    parser.add_argument("--max-batch-size", type=int, help="flow-matching dynamic batch (default 4 cpu, 8 gpu)")
    parser.add_argument("--preferred-batch-sizes", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--queue-delay-us", type=int, default=500,
                        help="flow matching's dynamic batcher: how long a lone request waits for company")
    parser.add_argument("--max-queue-size", type=int, default=64, help="requests waiting before rejection")
    parser.add_argument("--queue-timeout-us", type=int, default=60_000_000, help="queued longer -> rejected")
    parser.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                        help="GPU ids for flow-matching and vocoder instances, e.g. 0,1")
    parser.add_argument("--flow-instances", type=int, default=1,
                        help="flow-matching instances per GPU (or on the CPU); 2: a dead one leaves one serving")
    parser.add_argument("--vocoder-instances", type=int, default=1, help="vocoder instances per GPU")
    parser.add_argument("--preprocess-instances", type=int, default=2)
    parser.add_argument("--postprocess-instances", type=int, default=2)
    parser.add_argument("--dit-engine", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    parser.add_argument("--dit-engine-path", help=".onnx or .plan of the DiT step")
    parser.add_argument("--vocoder-engine", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                        help="python vocoder's engine (tensorrt: TensorRT-RTX plans, which the trt target's "
                             "native tensorrt_plan model cannot load)")
    parser.add_argument("--vocoder-engine-path", help=".onnx or .plan of Vocos for --vocoder-engine")
    parser.add_argument("--vocoder-plan", help="trt target: Vocos TensorRT plan")
    parser.add_argument("--vocoder-in-flow", action=argparse.BooleanOptionalAction, default=None,
                        help="flow_matching vocodes its batch in its own process and sends postprocess waveforms "
                             "(default: on for gpu, off for cpu; trt: off, its vocoder is a tensorrt_plan model)")
    parser.add_argument("--graph-steps", type=int, default=8,
                        help="gpu target: ODE steps per CUDA-graph replay (requests cancel between replays); 0 = per step")
    parser.add_argument("--graph-max-rows", type=int, default=2,
                        help="gpu target: DiT batches of more rows (2 per request) run without CUDA graphs")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="compile and capture CUDA graphs at load, before the server is ready (default: on for GPU "
                             "targets)")
    parser.add_argument("--no-streaming", action="store_true", help="leave out the f5_tts_streaming model")
    parser.add_argument("--streaming-granularity", choices=["step", "chunk"], default="chunk",
                        help="f5_tts_streaming: a new stream joins the batch at the next ODE step or the next chunk")
    parser.add_argument("--streaming-max-streams", type=int, default=16,
                        help="f5_tts_streaming: streams generated together per instance (more wait)")
    parser.add_argument("--streaming-max-queued", type=int, default=64,
                        help="f5_tts_streaming: streams waiting per instance; more are refused with UNAVAILABLE")
    parser.add_argument("--no-fallback", action="store_true", help="fail instead of falling back to torch")
    args = parser.parse_args()
    try:
        ckpt, vocab, vocoder = resolve_model_paths(args)
        options = RepositoryOptions(
            target=args.target, ckpt=ckpt, vocab=vocab, vocoder=vocoder, arch=args.arch, nfe_steps=args.nfe,
            dtype=args.dtype, max_batch_size=args.max_batch_size, preferred_batch_sizes=args.preferred_batch_sizes,
            queue_delay_us=args.queue_delay_us, max_queue_size=args.max_queue_size,
            queue_timeout_us=args.queue_timeout_us, gpus=args.gpus, flow_instances_per_device=args.flow_instances,
            vocoder_instances_per_device=args.vocoder_instances, preprocess_instances=args.preprocess_instances,
            postprocess_instances=args.postprocess_instances, dit_engine=args.dit_engine,
            dit_engine_path=args.dit_engine_path, vocoder_engine=args.vocoder_engine,
            vocoder_engine_path=args.vocoder_engine_path, vocoder_plan=args.vocoder_plan,
            vocoder_in_flow=args.vocoder_in_flow,
            dit_graph_steps=args.graph_steps, dit_graph_max_rows=args.graph_max_rows,
            warmup=args.warmup, streaming=not args.no_streaming, engine_fallback=not args.no_fallback,
            streaming_granularity=args.streaming_granularity, streaming_max_streams=args.streaming_max_streams,
            streaming_max_queued=args.streaming_max_queued)
        out = render(options, args.output)
    except (ValueError, InvalidInputError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
    print(f"rendered {args.target} model repository at {out}")


if __name__ == "__main__":
    main()
