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
import dataclasses
import json
import py_compile
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from f5_triton.config import (DEFAULT_CACHES, DEFAULT_LIMITS, DEFAULT_PACING, DEFAULT_SAMPLING, DEFAULT_SCHEDULER,
                              DEFAULT_STREAMING, DTYPES, N_MELS, SERVING_DOCUMENT, Limits, PlacementConfig,
                              WarmupConfig, WeightsConfig, serving_document, serving_section, setting, settings_from)
from f5_triton.flags import Flag, add_flags, environment_name, field_flag, flag_kwargs
from f5_triton.request import INPUTS, MODEL, OUTPUTS, STREAM_OUTPUTS, STREAMING_MODEL, WireField
from f5_triton.serving.wire import JOB_FIELDS, MEL_FIELDS, WAVE_FIELDS

TEMPLATES = Path(__file__).resolve().parents[1] / "model_repo"
TARGETS = ("cpu", "gpu", "trt")
STEP_MODELS = (MODEL, "preprocess", "flow_matching", "postprocess", "vocoder")


@dataclass(frozen=True)
class Section:
    """A section of the serving configuration (a frozen dataclass of `config.setting` fields) inside
    :class:`RepositoryOptions`: each field is the option `<option><name>` (or `nested` holds the whole section), the
    flag `--<flag><name>` and a field of the section in the serving document of `models` (`config.ServingSettings`),
    read back typed at load. `models` maps a field-name prefix to its models where the fields of one section go to
    different models."""

    defaults: Any
    models: tuple[str, ...] | dict[str, tuple[str, ...]] = ()
    option: str = ""
    nested: str | None = None
    flag: str | None = None  # default: `nested` or `option`

    def models_of(self, name: str) -> tuple[str, ...]:
        if isinstance(self.models, dict):
            return next(models for prefix, models in self.models.items() if name.startswith(prefix))
        return self.models

    @property
    def flag_prefix(self) -> str:
        return self.flag if self.flag is not None else (self.nested + "_" if self.nested else self.option)


SECTIONS = (
    Section(DEFAULT_SAMPLING, models=("preprocess", STREAMING_MODEL)),
    Section(DEFAULT_SCHEDULER, models=(STREAMING_MODEL,), option="streaming_"),
    Section(DEFAULT_PACING, models=(STREAMING_MODEL,), nested="streaming_pacing", flag="stream_pacing_"),
    Section(DEFAULT_STREAMING, models=(STREAMING_MODEL,)),
    Section(DEFAULT_CACHES, models={"reference_": ("preprocess", STREAMING_MODEL),
                                    "output_": ("flow_matching", STREAMING_MODEL)}),
)

# The settings a target decides when left unset (None): fp16 and larger batches on GPUs, compile / CUDA graphs / the
# vocoder in flow_matching's process on the gpu target, warm-up at load on GPUs (otherwise the first requests wait
# minutes for torch.compile); the trt target's vocoder is its own tensorrt_plan model.
TARGET_DEFAULTS = {
    "cpu": {"dtype": "fp32", "max_batch_size": 4, "warmup": False, "vocoder_in_flow": False, "dit_compile": False,
            "dit_cuda_graphs": False},
    "gpu": {"dtype": "fp16", "max_batch_size": 8, "warmup": True, "vocoder_in_flow": True, "dit_compile": True,
            "dit_cuda_graphs": True},
    "trt": {"dtype": "fp16", "max_batch_size": 8, "warmup": True, "vocoder_in_flow": False, "dit_compile": False,
            "dit_cuda_graphs": False},
}
ENGINES = ("torch", "onnxruntime", "tensorrt")


@dataclass
class _Options:
    """A rendered repository's settings: each has one default (None: the target's, `TARGET_DEFAULTS`) and a help;
    :func:`add_repository_arguments` makes each a flag (and `F5_REPO_<FLAG>` an environment name), :func:`render`
    writes them into the models' serving documents. The sections' fields (`SECTIONS`) follow these."""

    # the builder's own choice (run.sh: --backend, --target), never the environment's
    target: str = setting(None, "cpu, gpu or trt (module doc)", choices=TARGETS, required=True, environ=False)
    ckpt: Path = setting(None, "the DiT checkpoint", flag=None)  # --ckpt-dir and friends (model_paths)
    vocab: Path = setting(None, "the vocabulary", flag=None)
    vocoder: Path = setting(None, "the Vocos folder", flag=None)
    arch: str | None = setting(None, "architecture when no model.yaml is beside the checkpoint", flag=None)
    dtype: str | None = setting(None, "GPU precision", choices=sorted(DTYPES))
    max_batch_size: int | None = setting(None, "flow-matching dynamic batch (requests)")
    preferred_batch_sizes: list[int] | None = setting(None, "flow matching's preferred batches (default: half and "
                                                            "the whole of the largest)")
    # A lone request waits this long for company; under load batches fill while the instance is busy anyway
    # (H200: 2 ms -> 0.5 ms took concurrency-1 latency from +15 % to +8 % over offline, concurrency 16 unchanged).
    queue_delay_us: int = setting(500, "flow matching's dynamic batcher: how long a lone request waits for company")
    vocoder_max_batch_size: int = setting(8, "the vocoder model's dynamic batch")
    vocoder_queue_delay_us: int = setting(500, "the vocoder model's dynamic batcher delay")
    gpus: list[int] = setting([0], "GPU ids for flow-matching, vocoder and streaming instances, e.g. 0,1")
    flow_instances_per_device: int = setting(1, "flow-matching instances per GPU (or on the CPU); 2: a dead one "
                                                "leaves one serving (twice the model's memory)", flag="flow_instances")
    flow_standby: bool = setting(True, "the passive flow_matching instance that lets requests wait out a restart")
    vocoder_instances_per_device: int = setting(1, "vocoder instances per GPU", flag="vocoder_instances")
    preprocess_instances: int = setting(2, "preprocess instances")
    postprocess_instances: int = setting(2, "postprocess instances")
    dit_engine: str = setting("torch", "the DiT step's engine", choices=ENGINES)
    dit_engine_path: Path | None = setting(None, ".onnx or .plan of the DiT step")
    dit_compile: bool | None = setting(None, "torch engine on GPU: torch.compile the DiT step")
    dit_cuda_graphs: bool | None = setting(None, "torch engine on GPU: CUDA graphs per frame bucket")
    dit_graph_max_rows: int = setting(2, "gpu target: DiT batches of more rows (2 per request) run packed, without "
                                         "CUDA graphs", flag="graph_max_rows")
    dit_graph_steps: int = setting(8, "gpu target: ODE steps per CUDA-graph replay (requests cancel between "
                                      "replays); 0 = per step", flag="graph_steps")
    dit_graph_max_tokens: int = setting(12288, "gpu target: packed DiT batches of up to this many tokens (2 per "
                                               "frame of a request) replay CUDA graphs too; 0 = none",
                                        flag="graph_max_tokens")
    warmup: bool | None = setting(None, "compile and capture CUDA graphs at load, before the server is ready")
    # torch CPU threads per python-backend instance: CPU stages, and GPU instances (0 = one per core, torch's
    # default, kept for flow matching and the vocoder on the cpu target, where the DiT itself runs on them)
    torch_threads: int = setting(2, "torch CPU threads per python-backend instance (the cpu target's DiT and vocoder "
                                    "keep every core)")
    vocoder_engine: str = setting("torch", "python vocoder's engine (tensorrt: TensorRT-RTX plans, which the trt "
                                           "target's native tensorrt_plan model cannot load)", choices=ENGINES)
    vocoder_engine_path: Path | None = setting(None, ".onnx or .plan of Vocos for --vocoder-engine")
    vocoder_plan: Path | None = setting(None, "trt target: Vocos TensorRT plan")
    vocoder_in_flow: bool | None = setting(None, "flow_matching vocodes its batch in its own process and sends "
                                                 "postprocess waveforms (no second CUDA context time-slicing the GPU)")
    engine_fallback: bool = setting(True, "fall back to torch when an engine cannot load", flag="fallback")
    max_queue_size: int = setting(64, "requests waiting before rejection")
    queue_timeout_us: int = setting(60_000_000, "queued longer -> rejected")
    limits: dict[str, str] = setting({}, "request limits (config.Limits), e.g. {\"max_text_bytes\": \"1000\"}",
                                     flag="limit_")
    streaming: bool = setting(True, "render the f5_tts_streaming model")
    streaming_instances_per_device: int = setting(1, "f5_tts_streaming instances per GPU, each batching its streams "
                                                     "with its own DiT and vocoder", flag="streaming_instances")

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "trt":
            self.dit_engine = "tensorrt"
            if self.dit_engine_path is None or self.vocoder_plan is None:
                raise ValueError("the trt target needs --dit-engine-path (DiT .plan) and --vocoder-plan (Vocos .plan)")
            if self.vocoder_in_flow:
                raise ValueError("--vocoder-in-flow is for the cpu and gpu targets: the trt target's vocoder is "
                                 "its own tensorrt_plan model")
        for name, default in TARGET_DEFAULTS[self.target].items():
            value = getattr(self, name)
            if value is None or (not isinstance(value, bool) and not value):
                setattr(self, name, default)
        if not self.preferred_batch_sizes:
            self.preferred_batch_sizes = sorted({max(1, self.max_batch_size // 2), self.max_batch_size})


def options_type(sections: tuple[Section, ...] = SECTIONS) -> type:
    """The repository's options: `_Options` and the fields of `sections`, each a flag, a field of the serving documents and an
    environment name of its own."""
    extra = []
    for section in sections:
        if section.nested:
            extra.append((section.nested, type(section.defaults), field(default=section.defaults,
                                                                        metadata={"section": section})))
            continue
        for f in dataclasses.fields(section.defaults):
            extra.append((section.option + f.name, f.type,
                          field(default=f.default, metadata={**f.metadata, "section": section, "name": f.name})))
    return dataclasses.make_dataclass("RepositoryOptions", extra, bases=(_Options,),
                                      namespace={"__doc__": _Options.__doc__, "__module__": __name__})


RepositoryOptions = options_type()


REPOSITORY_ENV_PREFIX = "F5_REPO_"  # a repository option's environment name: F5_REPO_<FLAG>


def _flag(option: str, part: str | None, dest: str, kwargs: dict) -> Flag:
    return Flag(option, part, dest, kwargs, environment_name({}, dest, REPOSITORY_ENV_PREFIX))


def _help(f: dataclasses.Field, section: Section | None) -> str:
    """A flag's help: the setting's, after the models that read it, with the targets' defaults."""
    text = f.metadata["help"]
    if section is not None:
        text = f"{', '.join(section.models_of(f.metadata.get('name', f.name)))}: {text}"
    if f.name in TARGET_DEFAULTS["cpu"]:
        text += f" (default: {', '.join(f'{target} {values[f.name]}' for target, values in TARGET_DEFAULTS.items())})"
    return text


def repository_flags(options: type = None) -> list[Flag]:
    """Every flag of `options` (default :data:`RepositoryOptions`), in field order."""
    flags = []
    for f in dataclasses.fields(options or RepositoryOptions):
        meta = f.metadata
        section = meta.get("section")
        if section is not None and section.nested:
            flags += [_flag(f.name, part.name, section.flag_prefix + part.name,
                            flag_kwargs(part.type, part.default, {**part.metadata, "help": _help(part, section)}))
                      for part in dataclasses.fields(section.defaults)]
        elif f.name == "limits":
            flags += [_flag(f.name, part.name, meta["flag"] + part.name,
                            flag_kwargs(part.type, None, {"help": f"requests' {part.name} (config.Limits; default "
                                                                  f"{part.default})"}))
                      for part in dataclasses.fields(Limits)]
        else:
            flags.append(field_flag(f, _help(f, section), REPOSITORY_ENV_PREFIX))
    return [flag for flag in flags if flag is not None]


def add_repository_arguments(parser: argparse.ArgumentParser, options: type = None) -> None:
    """The options of a rendered repository as command-line arguments (scripts/build_model_repo.py,
    `f5-triton build repository`); :func:`options_from_args` turns them into :class:`RepositoryOptions`."""
    add_flags(parser, repository_flags(options))


def options_from_args(args: argparse.Namespace, ckpt: Path, vocab: Path, vocoder: Path,
                      options: type = None) -> RepositoryOptions:
    """:class:`RepositoryOptions` from the arguments of :func:`add_repository_arguments`."""
    options = options or RepositoryOptions
    values: dict = {"ckpt": ckpt, "vocab": vocab, "vocoder": vocoder, "arch": getattr(args, "arch", None)}
    parts: dict[str, dict] = {}
    for flag in repository_flags(options):
        value = getattr(args, flag.dest)
        if flag.part is None:
            values[flag.option] = value
        elif value is not None:
            parts.setdefault(flag.option, {})[flag.part] = value
    for f in dataclasses.fields(options):
        if f.name in parts or f.name == "limits":
            values[f.name] = (parts.get(f.name, {}) if f.name == "limits"
                              else dataclasses.replace(f.default, **parts[f.name]))
    return options(**values)


def environment_arguments(environ: Mapping[str, str], options: type = None) -> list[str]:
    """Flags for the options that `environ` sets, as `F5_REPO_<FLAG>` (F5_REPO_FIRST_CHUNK_BYTES=30,
    F5_REPO_WARMUP=false): what run.sh, compose and the K8s manifests pass to `f5-triton build repository`."""
    args = []
    for flag in repository_flags(options):
        value = environ.get(flag.env, "") if flag.env else ""
        if value != "":
            flag.parse(value)  # a ValueError naming F5_REPO_<FLAG> and what it must be
            args += flag.arguments(value)
    return args


def _section_documents(options) -> dict[str, dict[str, dict[str, object]]]:
    """The sections' part of each model's serving document: model -> section name -> {field: value}."""
    per_model: dict[str, dict[str, dict[str, object]]] = {}
    for f in dataclasses.fields(options):
        section = f.metadata.get("section")
        if section is None:
            continue
        value = getattr(options, f.name)
        parts = ([(part.name, getattr(value, part.name)) for part in dataclasses.fields(section.defaults)]
                 if section.nested else [(f.metadata["name"], value)])
        for name, part in parts:
            for model in section.models_of(name):
                per_model.setdefault(model, {}).setdefault(serving_section(section.defaults), {})[name] = part
    return per_model


def _field_block(fields: tuple[WireField, ...], ragged: bool = False, all_optional: bool = False) -> str:
    rows = []
    for f in fields:
        dims = ", ".join(str(d) for d in f.dims)
        extra = " optional: true" if f.optional or all_optional else ""
        if ragged and -1 in f.dims:
            extra += " allow_ragged_batch: true"
        rows.append(f'  {{ name: "{f.name}" data_type: {f.triton_type} dims: [ {dims} ]{extra} }}')
    return ",\n".join(rows)


def _tensor_map(kind: str, fields: tuple[WireField, ...], prefix: str = "") -> str:
    """Ensemble step lines mapping each field to the ensemble tensor `<prefix><name>`."""
    return "\n".join(f'      {kind} {{ key: "{f.name}" value: "{prefix}{f.name}" }}' for f in fields)


# The ensemble's tensors between preprocess and flow_matching: prefixed, as some share a request input's name
# (nfe_steps, cfg_strength) and an ensemble tensor has one producer.
JOB_TENSOR_PREFIX = "job_"


def _parameters(values: dict[str, object], document: dict[str, object] | None = None) -> str:
    """Parameter rows: `values` (strings for clients: `random_weights`), and the model's serving `document` as one
    JSON string, a section a line (adjacent quoted strings are one string in protobuf's text format)."""
    rows = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items() if v is not None]
    if document:
        items = [f"{json.dumps(name)}: {json.dumps(value)}" for name, value in document.items()]
        lines = ("{" + ", \n".join(items) + "}").split("\n")  # JSON strings hold no raw newline
        quoted = "\n".join("      '" + line.replace("\\", "\\\\").replace("'", "\\'") + "'" for line in lines)
        rows.append(f'  {{ key: "{SERVING_DOCUMENT}" value: {{ string_value:\n{quoted} }} }}')
    return ",\n".join(rows)


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
    chunk_fields = WAVE_FIELDS if options.vocoder_in_flow else MEL_FIELDS  # flow_matching -> postprocess
    values = {
        # Request inputs are all optional for Triton, so that a missing one reaches validate_request
        # ("target_text: is required") instead of the ensemble's "unexpected deadlock" error.
        "inputs": "input [\n" + _field_block(INPUTS, all_optional=True) + "\n]",
        "outputs": "output [\n" + _field_block(OUTPUTS) + "\n]",
        "stream_outputs": "output [\n" + _field_block(STREAM_OUTPUTS) + "\n]",
        "ragged_inputs": "input [\n" + _field_block(INPUTS, ragged=True, all_optional=True) + "\n]",
        "preprocess_input_map": _tensor_map("input_map", INPUTS),
        "job_outputs": _field_block(JOB_FIELDS),
        "job_inputs": _field_block(JOB_FIELDS, ragged=True),
        "job_output_map": _tensor_map("output_map", JOB_FIELDS, JOB_TENSOR_PREFIX),
        "job_input_map": _tensor_map("input_map", JOB_FIELDS, JOB_TENSOR_PREFIX),
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
    def resolved(path) -> str | None:
        return path and str(Path(path).resolve())

    # Each model's serving document (config.ServingSettings): the sections it reads at load.
    limits = settings_from(options.limits, DEFAULT_LIMITS)
    weights = WeightsConfig(ckpt=resolved(options.ckpt), vocab=resolved(options.vocab),
                            vocoder=resolved(options.vocoder), arch=options.arch, dtype=options.dtype)
    dit_engine = {"kind": options.dit_engine, "path": resolved(options.dit_engine_path),
                  "fallback": options.engine_fallback, "compile": options.dit_compile,
                  "cuda_graphs": options.dit_cuda_graphs, "graph_steps": options.dit_graph_steps,
                  "graph_max_rows": options.dit_graph_max_rows, "graph_max_tokens": options.dit_graph_max_tokens}
    vocoder_engine = {"kind": options.vocoder_engine, "path": resolved(options.vocoder_engine_path),
                      "fallback": options.engine_fallback}

    def placement(name: str, **changes) -> PlacementConfig:  # the DiT and Vocos keep every core on the CPU
        cores = kind == "KIND_CPU" and name in ("flow_matching", "vocoder", STREAMING_MODEL)
        return PlacementConfig(torch_threads=0 if cores else options.torch_threads, **changes)

    def warmup(requests: int) -> WarmupConfig:
        return WarmupConfig(requests=requests if options.warmup else 0, nfe_steps=options.nfe_steps)

    documents: dict[str, dict] = {
        "preprocess": {"weights": {"vocab": weights.vocab}, "limits": limits, "placement": placement("preprocess")},
        # vocode: flow_matching loads its own Vocoder (factories.load_flow_vocoder), with the vocoder model's engine
        "flow_matching": {"weights": weights, "dit_engine": dit_engine,
                          **({"vocoder_engine": vocoder_engine} if options.vocoder_in_flow else {}),
                          "warmup": warmup(options.max_batch_size), "limits": limits,
                          "placement": placement("flow_matching", vocode=options.vocoder_in_flow)},
        "postprocess": {"placement": placement("postprocess", vocoder_model="vocoder")},
        "vocoder": {"weights": {"vocoder": weights.vocoder}, "vocoder_engine": vocoder_engine, "limits": limits,
                    "placement": placement("vocoder")},
        STREAMING_MODEL: {"weights": weights, "dit_engine": dit_engine,
                          # the trt target's Vocos plan runs in process through the tensorrt engine
                          "vocoder_engine": {**vocoder_engine, "kind": "tensorrt",
                                             "path": resolved(options.vocoder_plan)}
                          if options.target == "trt" else vocoder_engine,
                          "warmup": warmup(options.streaming_max_streams), "limits": limits,
                          "placement": placement(STREAMING_MODEL)},
    }
    for name, sections in _section_documents(options).items():  # one output cache policy for both served models
        documents[name].update(sections)
    # what a client can read back from the models' config (f5_triton.client.random_weights)
    client_params = {"checkpoint": resolved(options.ckpt),
                     "random_weights": str(is_random_checkpoint(options.ckpt)).lower()}
    for name in STEP_MODELS + ((STREAMING_MODEL,) if options.streaming else ()):
        source, target = templates / name, output / name
        (target / "1").mkdir(parents=True)
        template_name = "config.pbtxt"
        if name == "vocoder":
            template_name = "config.pbtxt.trt" if options.target == "trt" else "config.pbtxt.python"
        text = Template((source / template_name).read_text()).substitute(
            values, parameters=_parameters(client_params if name in (MODEL, STREAMING_MODEL) else {},
                                           serving_document(documents.get(name, {}))))
        (target / "config.pbtxt").write_text(text)
        if name == "vocoder" and options.target == "trt":
            shutil.copyfile(options.vocoder_plan, target / "1" / "model.plan")
        elif (source / "1" / "model.py").exists():
            shutil.copyfile(source / "1" / "model.py", target / "1" / "model.py")
            # A stub writing __pycache__ into the version folder would make Triton see the model as modified,
            # and turn the watchdog's replacement of one instance into a reload of the whole model.
            py_compile.compile(str(target / "1" / "model.py"), doraise=True)
    return output
