"""Render a ready Triton model repository from the templates in model_repo/ for a target.

Targets:
  cpu   every step on the CPU, torch (or onnxruntime) engines, fp32
  gpu   flow matching and vocoder on GPU(s), torch engines, fp16 by default
  trt   flow matching through a TensorRT DiT plan (python model), vocoder as a native
        `tensorrt_plan` model; engines come from scripts/build_engines.py on the serving GPU

`vocoder_in_flow` (default: on for gpu, off for cpu and trt) decodes each dynamic batch's mels in
the flow_matching model's own process, on its device, so postprocess gets waveforms and only
restores level and cross-fades; off, postprocess calls the `vocoder` model per chunk (BLS). The
`vocoder` model is rendered either way (clients may call it directly).

Besides the `f5_tts` ensemble and its steps, `f5_tts_streaming` (decoupled, one response per text
chunk) is rendered unless `streaming=False`. Cache sizes of 0 turn the reference / output caches off.

flow_matching's instances are one instance group each, told apart by a host-policy name of their own, so
that the supervisor's watchdog can replace a dead one alone (`supervisor.watchdog.StubWatchdog`): Triton keeps the
others serving. A passive `standby` instance (it loads nothing) keeps the model valid while its last active
instance is replaced, so that requests queue meanwhile instead of failing.
"""

from __future__ import annotations

import argparse
import py_compile
import shutil
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from f5_triton.cache import OUTPUT_CACHE_DEFAULTS, REFERENCE_CACHE_DEFAULTS
from f5_triton.config import DEFAULT_FIRST_CHUNK_BYTES, DEFAULT_PACING, DEFAULT_SAMPLING, DTYPES, N_MELS, PacingConfig
from f5_triton.request import INPUTS, MODEL, OUTPUTS, STREAM_OUTPUTS, STREAMING_MODEL, WireField
from f5_triton.serving.wire import MEL_FIELDS, WAVE_FIELDS

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repo"
TARGETS = ("cpu", "gpu", "trt")
STEP_MODELS = (MODEL, "preprocess", "flow_matching", "postprocess", "vocoder")


@dataclass
class RepositoryOptions:
    target: str
    ckpt: Path
    vocab: Path
    vocoder: Path
    arch: str | None = None
    nfe_steps: int = DEFAULT_SAMPLING.nfe_steps
    sway_sampling_coef: float = DEFAULT_SAMPLING.sway_sampling_coef
    dtype: str | None = None  # fp32 | fp16 | bf16; default fp32 on cpu, fp16 on GPUs
    max_batch_size: int | None = None  # flow-matching batch (requests); default 4 on cpu, 8 on GPUs
    preferred_batch_sizes: list[int] | None = None
    # A lone request waits this long for company; under load batches fill while the instance is busy anyway
    # (H200: 2 ms -> 0.5 ms took concurrency-1 latency from +15 % to +8 % over offline, concurrency 16 unchanged).
    queue_delay_us: int = 500
    vocoder_max_batch_size: int = 8
    vocoder_queue_delay_us: int = 500
    gpus: list[int] = field(default_factory=lambda: [0])
    flow_instances_per_device: int = 1  # 2: one death leaves one serving (twice the model's memory)
    flow_standby: bool = True  # the passive flow_matching instance that lets requests wait out a restart
    vocoder_instances_per_device: int = 1
    preprocess_instances: int = 2
    postprocess_instances: int = 2
    dit_engine: str = "torch"  # torch | onnxruntime | tensorrt
    dit_engine_path: Path | None = None
    dit_compile: bool | None = None  # torch engine on GPU: torch.compile the DiT step (default on for gpu)
    dit_cuda_graphs: bool | None = None  # torch engine on GPU: CUDA graphs per frame bucket (default on for gpu)
    dit_graph_max_rows: int = 2  # with CUDA graphs: larger DiT batches (2 rows per request) run packed, without graphs
    dit_graph_steps: int = 8  # with CUDA graphs: ODE steps per graph replay (cancellation granularity); 0 = per step
    # with CUDA graphs: packed DiT batches of up to this many tokens (2 per frame of a request) replay graphs too
    dit_graph_max_tokens: int = 12288
    # flow matching runs synthetic batches at load (compile, graph captures) before the server reports ready;
    # default on for GPU targets, where otherwise the first requests wait minutes for torch.compile
    warmup: bool | None = None
    # torch CPU threads per python-backend instance: CPU stages, and GPU instances (0 = one per core, torch's
    # default, kept for flow matching and the vocoder on the cpu target, where the DiT itself runs on them)
    torch_threads: int = 2
    vocoder_engine: str = "torch"  # for the python vocoder: torch | onnxruntime | tensorrt (TensorRT-RTX plans)
    vocoder_engine_path: Path | None = None
    vocoder_plan: Path | None = None  # trt target: the Vocos TensorRT plan
    # flow_matching vocodes its batch in its own process (no second CUDA context time-slicing the GPU);
    # default on for gpu, off for cpu and trt (whose vocoder is the native tensorrt_plan model)
    vocoder_in_flow: bool | None = None
    engine_fallback: bool = True
    max_queue_size: int = 64
    queue_timeout_us: int = 60_000_000
    limits: dict[str, str] = field(default_factory=dict)  # Limits overrides, e.g. {"max_text_bytes": "1000"}
    streaming: bool = True  # render f5_tts_streaming
    streaming_instances_per_device: int = 1  # each batches its streams (stream_scheduler), with its own DiT + vocoder
    streaming_granularity: str = "cohort"  # how streams share the DiT: "cohort" or "chunk" (docs/streaming.md)
    streaming_max_streams: int = 16  # streams generated together per instance; more wait
    streaming_max_queued: int = 64  # streams waiting per instance; more are refused with UNAVAILABLE (retry)
    streaming_pacing: PacingConfig = DEFAULT_PACING  # admission by playback deadline, the queue's time limit
    first_chunk_bytes: int = DEFAULT_FIRST_CHUNK_BYTES  # streaming: UTF-8 bytes of the first chunk (split_for_streaming)
    reference_cache_entries: int = int(REFERENCE_CACHE_DEFAULTS["entries"])  # preprocess + streaming; 0 = off
    reference_cache_mb: float = REFERENCE_CACHE_DEFAULTS["mb"]
    output_cache_entries: int = int(OUTPUT_CACHE_DEFAULTS["entries"])  # both models, seeded requests only; 0 = off
    output_cache_mb: float = OUTPUT_CACHE_DEFAULTS["mb"]

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        on_gpu = self.target != "cpu"
        self.dtype = self.dtype or ("fp16" if on_gpu else "fp32")
        self.max_batch_size = self.max_batch_size or (8 if on_gpu else 4)
        self.warmup = on_gpu if self.warmup is None else self.warmup
        if not self.preferred_batch_sizes:
            self.preferred_batch_sizes = sorted({max(1, self.max_batch_size // 2), self.max_batch_size})
        if self.target == "trt":
            self.dit_engine = "tensorrt"
            if self.dit_engine_path is None or self.vocoder_plan is None:
                raise ValueError("the trt target needs --dit-engine-path (DiT .plan) and --vocoder-plan (Vocos .plan)")
            if self.vocoder_in_flow:
                raise ValueError("--vocoder-in-flow is for the cpu and gpu targets: the trt target's vocoder is "
                                 "its own tensorrt_plan model")
        if self.vocoder_in_flow is None:
            self.vocoder_in_flow = self.target == "gpu"


def _field_block(fields: tuple[WireField, ...], ragged: bool = False, all_optional: bool = False) -> str:
    rows = []
    for f in fields:
        dims = ", ".join(str(d) for d in f.dims)
        extra = " optional: true" if f.optional or all_optional else ""
        if ragged and -1 in f.dims:
            extra += " allow_ragged_batch: true"
        rows.append(f'  {{ name: "{f.name}" data_type: {f.triton_type} dims: [ {dims} ]{extra} }}')
    return ",\n".join(rows)


def _tensor_map(kind: str, fields: tuple[WireField, ...]) -> str:
    """Ensemble step lines mapping each field to the ensemble tensor of the same name."""
    return "\n".join(f'      {kind} {{ key: "{f.name}" value: "{f.name}" }}' for f in fields)


def _parameters(values: dict[str, object]) -> str:
    return ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items()
                      if v is not None)


def _instances(count: int, kind: str, gpus: list[int]) -> str:
    if kind == "KIND_CPU":
        return f"  {{ count: {count} kind: KIND_CPU }}"
    devices = ", ".join(str(g) for g in gpus)
    return f"  {{ count: {count} kind: KIND_GPU gpus: [ {devices} ] }}"


STANDBY_GROUP = "standby"


def _flow_instances(model: str, count: int, kind: str, gpus: list[int], standby: bool) -> str:
    """One group per instance (`<model>_<device>_<slot>`), each with its own host-policy name: Triton tells
    instances of a model apart by their group's settings (name and count aside), and the watchdog
    removes or adds exactly one. The policy names are not defined on the command line, so they set nothing."""
    devices = ["cpu"] if kind == "KIND_CPU" else [f"gpu{g}" for g in gpus]
    rows = []
    for device in devices:
        placement = "kind: KIND_CPU" if device == "cpu" else f"kind: KIND_GPU gpus: [ {device[3:]} ]"
        for slot in range(count):
            name = f"{model}_{device}_{slot}"
            rows.append(f'  {{ name: "{name}" count: 1 {placement} host_policy: "{name}" }}')
    if standby:
        rows.append(f'  {{ name: "{model}_{STANDBY_GROUP}" count: 1 kind: KIND_CPU passive: true }}')
    return ",\n".join(rows)


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a rendered repository as command-line arguments (scripts/build_model_repo.py,
    `f5-triton build repository`); :func:`options_from_args` turns them into :class:`RepositoryOptions`."""
    parser.add_argument("--target", required=True, choices=TARGETS)
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
    parser.add_argument("--graph-max-tokens", type=int, default=RepositoryOptions.dit_graph_max_tokens,
                        help="gpu target: packed DiT batches of up to this many tokens (2 per frame of a request) "
                             "replay CUDA graphs too; 0 = none")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="compile and capture CUDA graphs at load, before the server is ready (default: on for GPU "
                             "targets)")
    parser.add_argument("--no-streaming", action="store_true", help="leave out the f5_tts_streaming model")
    parser.add_argument("--streaming-granularity", choices=["cohort", "chunk"], default="cohort",
                        help="f5_tts_streaming: how streams share the DiT (docs/streaming.md): new streams' first chunks "
                             "between segments of the others' (cohort), or in the next round of whole chunks (chunk)")
    parser.add_argument("--streaming-max-streams", type=int, default=16,
                        help="f5_tts_streaming: streams generated together per instance (more wait)")
    parser.add_argument("--streaming-max-queued", type=int, default=64,
                        help="f5_tts_streaming: streams waiting per instance; more are refused with UNAVAILABLE")
    for f in dataclasses.fields(PacingConfig):
        default = getattr(DEFAULT_PACING, f.name)
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
        parser.add_argument(f"--stream-pacing-{f.name.replace('_', '-')}", dest=f"stream_pacing_{f.name}",
                            default=default, help=f"f5_tts_streaming: {f.metadata['help']}", **kind)
    parser.add_argument("--no-fallback", action="store_true", help="fail instead of falling back to torch")


def options_from_args(args: argparse.Namespace, ckpt: Path, vocab: Path, vocoder: Path) -> RepositoryOptions:
    """:class:`RepositoryOptions` from the arguments of :func:`add_repository_arguments`."""
    return RepositoryOptions(
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
        dit_graph_max_tokens=args.graph_max_tokens,
        warmup=args.warmup, streaming=not args.no_streaming, engine_fallback=not args.no_fallback,
        streaming_granularity=args.streaming_granularity, streaming_max_streams=args.streaming_max_streams,
        streaming_max_queued=args.streaming_max_queued,
        streaming_pacing=PacingConfig(**{f.name: getattr(args, f"stream_pacing_{f.name}")
                                         for f in dataclasses.fields(PacingConfig)}))


def render(options: RepositoryOptions, output: str | Path, templates: Path = TEMPLATES) -> Path:
    """Write a complete model repository to `output` (replaced if it exists)."""
    from f5_triton.checkpoints import is_random_checkpoint

    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    kind = "KIND_CPU" if options.target == "cpu" else "KIND_GPU"
    queue_policy = (f"  default_queue_policy {{\n    timeout_action: REJECT\n"
                    f"    default_timeout_microseconds: {options.queue_timeout_us}\n"
                    f"    allow_timeout_override: true\n    max_queue_size: {options.max_queue_size}\n  }}")
    common = {
        "ckpt": Path(options.ckpt).resolve(), "vocab": Path(options.vocab).resolve(),
        "vocoder": Path(options.vocoder).resolve(), "arch": options.arch, "dtype": options.dtype,
        "engine_fallback": str(options.engine_fallback).lower(),
        **{f"limit_{k}": v for k, v in options.limits.items()},
    }
    chunk_fields = WAVE_FIELDS if options.vocoder_in_flow else MEL_FIELDS  # flow_matching -> postprocess
    values = {
        # Request inputs are all optional for Triton, so that a missing one reaches validate_request
        # ("target_text: is required") instead of the ensemble's "unexpected deadlock" error.
        "inputs": "input [\n" + _field_block(INPUTS, all_optional=True) + "\n]",
        "outputs": "output [\n" + _field_block(OUTPUTS) + "\n]",
        "stream_outputs": "output [\n" + _field_block(STREAM_OUTPUTS) + "\n]",
        "ragged_inputs": "input [\n" + _field_block(INPUTS, ragged=True, all_optional=True) + "\n]",
        "preprocess_input_map": _tensor_map("input_map", INPUTS),
        "n_mels": N_MELS,
        "flow_matching_outputs": "output [\n" + _field_block(chunk_fields) + "\n]",
        "flow_matching_output_map": _tensor_map("output_map", chunk_fields),
        "postprocess_chunk_inputs": _field_block(MEL_FIELDS + WAVE_FIELDS, ragged=True, all_optional=True),
        "postprocess_chunk_map": _tensor_map("input_map", chunk_fields),
        "max_batch_size": options.max_batch_size,
        "preferred_batch_sizes": ", ".join(str(b) for b in options.preferred_batch_sizes),
        "queue_delay_us": options.queue_delay_us,
        "queue_policy": queue_policy,
        "vocoder_max_batch_size": options.vocoder_max_batch_size,
        "vocoder_queue_delay_us": options.vocoder_queue_delay_us,
        "preprocess_instances": options.preprocess_instances,
        "postprocess_instances": options.postprocess_instances,
        "flow_matching_instances": _flow_instances("flow_matching", options.flow_instances_per_device, kind,
                                                   options.gpus, options.flow_standby),
        "vocoder_instances": _instances(options.vocoder_instances_per_device, kind, options.gpus),
        "streaming_instances": _instances(options.streaming_instances_per_device, kind, options.gpus),
    }
    reference_cache = {"reference_cache_entries": options.reference_cache_entries,
                       "reference_cache_mb": options.reference_cache_mb}
    # one output cache policy for both served models: f5_tts keeps its outputs in flow_matching
    output_cache = {"output_cache_entries": options.output_cache_entries, "output_cache_mb": options.output_cache_mb}
    per_model = {
        "preprocess": {"vocab": common["vocab"], "nfe_steps": options.nfe_steps,
                       "sway_sampling_coef": options.sway_sampling_coef, **reference_cache,
                       **{k: v for k, v in common.items() if k.startswith("limit_")}},
        "flow_matching": {**common, "dit_engine": options.dit_engine,
                          "dit_compile": str(options.target == "gpu" if options.dit_compile is None
                                             else options.dit_compile).lower(),
                          "dit_cuda_graphs": str(options.target == "gpu" if options.dit_cuda_graphs is None
                                                 else options.dit_cuda_graphs).lower(),
                          "dit_graph_steps": options.dit_graph_steps,
                          "dit_graph_max_rows": options.dit_graph_max_rows,
                          "dit_graph_max_tokens": options.dit_graph_max_tokens,
                          "warmup_requests": options.max_batch_size if options.warmup else 0,
                          "warmup_nfe_steps": options.nfe_steps,
                          "dit_engine_path": options.dit_engine_path and Path(options.dit_engine_path).resolve(),
                          **output_cache},
        "postprocess": {"vocoder_model": "vocoder"},
        "vocoder": {"vocoder": common["vocoder"], "engine_fallback": common["engine_fallback"],
                    **{k: v for k, v in common.items() if k.startswith("limit_")},
                    "vocoder_engine": options.vocoder_engine,
                    "vocoder_engine_path": options.vocoder_engine_path and Path(options.vocoder_engine_path).resolve()},
    }
    # what a client can read back from the models' config (f5_triton.client.random_weights)
    weights = {"checkpoint": common["ckpt"], "random_weights": str(is_random_checkpoint(options.ckpt)).lower()}
    per_model[STREAMING_MODEL] = {**weights,
        **per_model["flow_matching"], "nfe_steps": options.nfe_steps, "sway_sampling_coef": options.sway_sampling_coef,
        # the trt target's Vocos plan runs in process through the tensorrt engine
        **({"vocoder_engine": "tensorrt", "vocoder_engine_path": Path(options.vocoder_plan).resolve()}
           if options.target == "trt" else
           {k: v for k, v in per_model["vocoder"].items() if k.startswith("vocoder_engine")}),
        "warmup_requests": options.streaming_max_streams if options.warmup else 0,
        "first_chunk_bytes": options.first_chunk_bytes, **reference_cache,
        "granularity": options.streaming_granularity, "max_streams": options.streaming_max_streams,
        "max_queued": options.streaming_max_queued,
        **{f"pacing_{f.name}": str(getattr(options.streaming_pacing, f.name)).lower()
           for f in dataclasses.fields(PacingConfig)},
    }
    # vocode: flow_matching loads its own Vocoder (factories.load_flow_vocoder), with the vocoder model's engine settings
    per_model["flow_matching"]["vocode"] = str(options.vocoder_in_flow).lower()
    if options.vocoder_in_flow:
        per_model["flow_matching"].update(
            (k, v) for k, v in per_model["vocoder"].items() if k.startswith("vocoder_engine"))
    for name, params in per_model.items():  # the DiT and Vocos keep every core where they run on the CPU
        params["torch_threads"] = (0 if kind == "KIND_CPU" and name in ("flow_matching", "vocoder", STREAMING_MODEL)
                                   else options.torch_threads)
    per_model["f5_tts"] = weights
    for name in STEP_MODELS + ((STREAMING_MODEL,) if options.streaming else ()):
        source, target = templates / name, output / name
        (target / "1").mkdir(parents=True)
        template_name = "config.pbtxt"
        if name == "vocoder":
            template_name = "config.pbtxt.trt" if options.target == "trt" else "config.pbtxt.python"
        text = Template((source / template_name).read_text()).substitute(
            values, parameters=_parameters(per_model.get(name, {})))
        (target / "config.pbtxt").write_text(text)
        if name == "vocoder" and options.target == "trt":
            shutil.copyfile(options.vocoder_plan, target / "1" / "model.plan")
        elif (source / "1" / "model.py").exists():
            shutil.copyfile(source / "1" / "model.py", target / "1" / "model.py")
            # A stub writing __pycache__ into the version folder would make Triton see the model as modified,
            # and turn the watchdog's replacement of one instance into a reload of the whole model.
            py_compile.compile(str(target / "1" / "model.py"), doraise=True)
    return output
