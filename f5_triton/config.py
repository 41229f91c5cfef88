"""One source of truth for architectures, audio constants, sampling defaults and serving limits."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

# Audio: Vocos mel-24khz features, as every released F5-TTS checkpoint uses.
SAMPLE_RATE = 24_000
HOP_LENGTH = 256
WIN_LENGTH = 1024
N_FFT = 1024
N_MELS = 100
TARGET_RMS = 0.1  # quiet references are raised to this level and the output lowered back
CROSS_FADE_SECONDS = 0.15


def vocoder_samples(frames: int, hop_length: int = HOP_LENGTH) -> int:
    """Samples Vocos makes of `frames` mel frames: its ISTFT is centred (half a window trimmed at both
    ends, as the published charactr/vocos-mel-24khz config says), so (frames - 1) * hop."""
    return max(frames - 1, 0) * hop_length


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the F5-TTS DiT backbone; keyword names are upstream's `DiT(**arch)`."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = N_MELS
    text_num_embeds: int = 2545  # vocab size; the embedding table has one more row (filler token 0)
    text_dim: int = 512
    text_mask_padding: bool = True
    qk_norm: str | None = None
    conv_layers: int = 4
    pe_attn_head: int | None = None

    def arch_dict(self) -> dict:
        """The `model.arch` section of upstream's configs/*.yaml (without vocab or mel size)."""
        d = dataclasses.asdict(self)
        d.pop("mel_dim")
        d.pop("text_num_embeds")
        return d

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_arch(cls, arch: dict, **overrides) -> "DiTConfig":
        """Build from upstream's `model.arch` mapping, ignoring training-only keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in arch.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)


ARCHITECTURES: dict[str, DiTConfig] = {
    "F5TTS_v1_Base": DiTConfig(),
    "F5TTS_Base": DiTConfig(text_mask_padding=False, pe_attn_head=1),
    "F5TTS_v1_Small": DiTConfig(dim=768, depth=18, heads=12),
    "F5TTS_Small": DiTConfig(dim=768, depth=18, heads=12, text_mask_padding=False, pe_attn_head=1),
    # For tests and demos only: same structure as v1 Base, a few hundred thousand parameters.
    "tiny": DiTConfig(dim=64, depth=2, heads=2, dim_head=32, text_dim=32, conv_layers=1, text_num_embeds=256),
}


def setting(default, help: str, **meta):
    """A serving setting: a dataclass field with its one default and its `help` in the field's metadata.

    Sections of the serving configuration (`SamplingConfig`, `PacingConfig`, `StreamingConfig`, `SchedulerConfig`,
    `CacheConfig`, and `repository.RepositoryOptions`) declare their fields with it; `repository` turns each into a
    command-line flag, an environment name and a field of the models' serving document, which they read back once at
    load (`load_serving_document`). Further `meta`: `flag` (the flag's name when not the field's; None: no flag of its own),
    `choices`, `required`, `environ` (the environment name that sets it; False: none; default: the flags' prefix and
    the flag's name, as `F5_REPO_<FLAG>`: `flags.environment_name`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of upstream `infer_process` / `CFM.sample`: a served model's where a request sends none."""

    nfe_steps: int = setting(32, "ODE steps when a request sends none (16 or 7: faster)", flag="nfe")
    cfg_strength: float = setting(2.0, "classifier-free guidance strength when a request sends none")
    sway_sampling_coef: float = setting(-1.0, "sway sampling of the time grid (not a request field)")
    speed: float = setting(1.0, "speaking rate when a request sends none")


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; the validator, Triton configs, clients and docs read these."""

    max_text_bytes: int = 2000
    min_reference_seconds: float = 0.3
    max_reference_seconds: float = 30.0  # hard maximum of what a client may send
    clip_reference_seconds: float = 12.0  # longer references are clipped at a silence, as upstream
    min_sample_rate: int = 8_000
    max_sample_rate: int = 48_000
    min_nfe_steps: int = 1
    max_nfe_steps: int = 64
    min_cfg_strength: float = 0.0
    max_cfg_strength: float = 10.0
    min_speed: float = 0.3
    max_speed: float = 3.0
    max_mel_frames: int = 4096  # ~43.7 s of 24 kHz audio: the engines' shape profile

    def max_request_bytes(self, encoding: str = "binary") -> int:
        """Largest request body a valid request needs: the longest reference at the highest rate,
        both texts and 1 MiB of headers and small fields. `encoding` is "binary" (gRPC, or HTTP with
        binary tensors: 4 bytes a sample) or "json" (HTTP JSON tensors, as upstream's client_http.py:
        up to 24 characters a sample, 6 a text byte once escaped)."""
        per_sample, per_text_byte = {"binary": (4, 1), "json": (24, 6)}[encoding]
        samples = int(self.max_reference_seconds * self.max_sample_rate)
        return samples * per_sample + 2 * self.max_text_bytes * per_text_byte + (1 << 20)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PacingConfig:
    """How the stream scheduler keeps every admitted stream ahead of its listener (docs/streaming.md)."""

    enabled: bool = setting(True, (
        "admit streams by playback deadline and run later chunks first when a listener would run out; off: admit "
        "by the stream limit alone"))
    margin_seconds: float = setting(0.25, (
        "a streamed piece is due this long before its listener would run out (network, client buffering)"))
    queue_seconds: float = setting(10.0, (
        "a stream waits at most this long to start, then is refused with UNAVAILABLE (retriable)"))


@dataclass(frozen=True)
class StreamingConfig:
    """How f5_tts_streaming cuts a text into pieces (`text.StreamingChunker`'s settings) and samples the first one,
    and when it does not split a first chunk off (`streaming.StreamingSynthesizer`)."""

    first_chunk_bytes: int = setting(50, (  # as upstream's socket server: about one short sentence
        "UTF-8 bytes of a stream's first text chunk (text.split_for_streaming): shorter, the first audio sooner"))
    first_chunk_nfe_steps: int = setting(0, (
        "opt-in, off (0) by default: ODE steps of a stream's first chunk, at most the request's own; at 5, 6, 7, 10 "
        "or 12 on upstream's EPSS grid. The first audio comes sooner; its quality cannot be judged without the "
        "published weights (docs/streaming.md)"))
    unsplit_at_load: int = setting(0, (
        "opt-in, off (0) by default: from this many streams held (generated + waiting) when a stream arrives, its "
        "text is cut as whole responses cut it, with no short first chunk (nor fewer first-chunk steps): its first "
        "audio comes later, its DiT work is one reference pass less, its audio the whole-response model's for the "
        "same seed (docs/streaming.md)"))


@dataclass(frozen=True)
class SchedulerConfig:
    """How f5_tts_streaming batches its streams (`stream_scheduler.StreamScheduler`'s keywords)."""

    granularity: str = setting("cohort", (
        "how streams share the DiT (docs/streaming.md): new streams' first chunks between segments of the "
        "others' (cohort), or in the next round of whole chunks (chunk)"), choices=("cohort", "chunk"))
    max_streams: int = setting(16, "streams generated together per instance (more wait)")
    max_queued: int = setting(64, "streams waiting per instance; more are refused with UNAVAILABLE (retriable)")


@dataclass(frozen=True)
class CacheConfig:
    """Prompt and output caches (`cache.cache_from_config`); 0 entries turns a cache off. A 12 s reference is
    ~450 kB of mel, a 30 s output ~2.9 MB of float32."""

    reference_cache_entries: int = setting(128, "references kept prepared (preprocess, f5_tts_streaming); 0 = off")
    reference_cache_mb: float = setting(64.0, "reference cache size limit in MiB")
    output_cache_entries: int = setting(32, (
        "seeded requests' outputs kept (flow_matching, f5_tts_streaming); 0 = off"))
    output_cache_mb: float = setting(128.0, "output cache size limit in MiB")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how `f5-triton serve` runs tritonserver (`flags.setting_flags` makes its flags); the clients, the
    gateway and run.sh, compose and the K8s manifests use these ports and environment names too."""

    host: str = setting("127.0.0.1", (
        "address the HTTP, gRPC and metrics ports listen on; 0.0.0.0: all interfaces (then set F5_TRITON_ADMIN_KEY, "
        "see README)"), environ="F5_TRITON_HOST")
    http_port: int = setting(8000, "HTTP (KServe v2) port", environ="HTTP_PORT")
    grpc_port: int = setting(8001, "gRPC (KServe v2) port", environ="GRPC_PORT")
    metrics_port: int = setting(8002, "Prometheus metrics port", environ="METRICS_PORT")
    log_verbose: int = setting(0, "tritonserver --log-verbose level")
    ready_timeout_seconds: float = setting(600.0, "seconds to wait for all models", flag="ready_timeout",
                                           environ="READY_TIMEOUT")


DEFAULT_SERVER = ServerConfig()
DEFAULT_PACING = PacingConfig()
DEFAULT_STREAMING = StreamingConfig()
DEFAULT_SCHEDULER = SchedulerConfig()
DEFAULT_CACHES = CacheConfig()

# CUDA graphs need fixed shapes: a call's frames are padded up to the next of these (< 5% waste).
CUDA_GRAPH_FRAME_BUCKETS = tuple(range(64, DEFAULT_LIMITS.max_mel_frames + 1, 64))
DEFAULT_SAMPLING = SamplingConfig()

# Settings arrive as strings (environment names, limit flags) or typed values (CLI flags): these read both.

# Precision names of CLI flags and model parameters -> torch dtype attribute (`engines.base.torch_dtype`).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_bool(value, default: bool | None = None) -> bool:
    """A setting as a bool: "true"/"1"/"yes"/"on" or "false"/"0"/"no"/"off"/"" (any case), or a bool. None (not
    set) gives `default` when there is one; any other string raises ValueError."""
    if value is None and default is not None:
        return default
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def settings_from(params: dict[str, str], defaults, prefix: str = ""):
    """`defaults` (a dataclass instance: `DEFAULT_LIMITS`, `DEFAULT_SAMPLING`, a section) with every
    `<prefix><field>` of `params` applied, each converted to its field's type."""
    changes = {}
    for f in dataclasses.fields(defaults):
        value = params.get(prefix + f.name)
        if value is not None:
            kind = type(getattr(defaults, f.name))
            changes[f.name] = parse_bool(value) if kind is bool else kind(value)
    return dataclasses.replace(defaults, **changes)


# -- The serving document: each rendered model's settings, one typed JSON parameter of its config.pbtxt ------------

SERVING_DOCUMENT = "serving_config"  # the parameter's key (repository.render writes it, triton_io.Adapter reads it)


@dataclass(frozen=True)
class WeightsConfig:
    """What a served model loads (absolute paths, as rendered) and its precision on a GPU."""

    ckpt: str | None = None
    vocab: str | None = None
    vocoder: str | None = None
    arch: str | None = None  # None: the checkpoint's model.yaml
    dtype: str = "fp32"


@dataclass(frozen=True)
class WarmupConfig:
    """Synthetic batches run at load (`factories.warm_up`): compiles and graph captures happen before ready."""

    requests: int = 0  # 0: no warm-up
    nfe_steps: int = DEFAULT_SAMPLING.nfe_steps
    every_shape: bool = True  # then every other shape such batches can take, up to the frame limit


@dataclass(frozen=True)
class PlacementConfig:
    """Where a model's work runs."""

    torch_threads: int | None = None  # torch CPU threads of the instance's process (RepositoryOptions'); 0 or None:
    # torch's default, one per core
    vocode: bool = False  # flow_matching decodes its batch's mels in its own process (wire.WAVE_FIELDS)
    vocoder_model: str = "vocoder"  # the model postprocess calls for mels (BLS)


@dataclass(frozen=True)
class ServingSettings:
    """A served model's settings, rendered into its config.pbtxt as one JSON document (`SERVING_DOCUMENT`: the
    sections it uses, each `dataclasses.asdict` of its section) and read back once at load
    (:func:`load_serving_document`); a section the document leaves out keeps its defaults. `dit_engine` and
    `vocoder_engine` are `engines.EngineConfig`'s fields (which that class checks: it lives above this layer)."""

    weights: WeightsConfig = WeightsConfig()
    dit_engine: dict = field(default_factory=dict)
    vocoder_engine: dict = field(default_factory=dict)
    warmup: WarmupConfig = WarmupConfig()
    placement: PlacementConfig = PlacementConfig()
    limits: Limits = DEFAULT_LIMITS
    sampling: SamplingConfig = DEFAULT_SAMPLING
    scheduler: SchedulerConfig = DEFAULT_SCHEDULER
    pacing: PacingConfig = DEFAULT_PACING
    streaming: StreamingConfig = DEFAULT_STREAMING
    caches: CacheConfig = DEFAULT_CACHES


def serving_section(section) -> str:
    """The document's name of a section (`SamplingConfig()` -> "sampling")."""
    return next(name for name, kind in typing.get_type_hints(ServingSettings).items()
                if isinstance(kind, type) and isinstance(section, kind))


def _typed(value, kind, where: str):
    """`value` (parsed JSON) as a value of the annotation `kind`, or ValueError naming the field `where`."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for option in options:
        if dataclasses.is_dataclass(option):
            return _section_from(value, option, where)
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (str, dict) and isinstance(value, option):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ValueError(f"{SERVING_DOCUMENT}: {where} must be {names}, got {value!r}")


def _section_from(values, kind: type, where: str):
    """A section (or the whole document: `where` "") of parsed JSON -> `kind`, each field checked."""
    if not isinstance(values, dict):
        raise ValueError(f"{SERVING_DOCUMENT}: {where or 'the document'} must be an object of {kind.__name__}'s "
                         f"fields, got {values!r}")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{SERVING_DOCUMENT}: {where or 'the document'} has unknown fields {unknown}; known: "
                         f"{sorted(hints)}")
    typed = {name: _typed(value, hints[name], f"{where}.{name}".lstrip(".")) for name, value in values.items()}
    for f in dataclasses.fields(kind):
        choices = f.metadata.get("choices")
        if choices and f.name in typed and typed[f.name] not in choices:
            raise ValueError(f"{SERVING_DOCUMENT}: {where}.{f.name} must be one of {choices}, got {typed[f.name]!r}")
    return kind(**typed)


def serving_document(sections: dict) -> dict:
    """The document of `sections` (name -> a section dataclass, or a dict of some of its fields), as JSON values."""
    return {name: value if isinstance(value, dict) else dataclasses.asdict(value) for name, value in sections.items()}


def load_serving_document(text: str | None, kind: type = ServingSettings) -> ServingSettings:
    """A model's `SERVING_DOCUMENT` (JSON; None or empty: every default) -> its typed settings (`kind`: a
    ServingSettings, or a subclass of it with other sections). A section or field that does not exist, or a value of
    the wrong type, is a ValueError naming it ("sampling.nfe_steps must be int, got 3.5")."""
    try:
        document = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SERVING_DOCUMENT}: not JSON: {exc}") from None
    return _section_from(document, kind, "")
