"""The engine interface: what each network takes and returns, how an engine is chosen, its errors.

An engine runs one network (the DiT step or the vocoder) on torch tensors, whatever executes it:
eager or compiled torch, onnxruntime, or TensorRT. Tensor names, dtypes and axes are declared once
here (`DIT_STEP`, `VOCODER`) and read by the torch wrappers, the ONNX exporter, the TensorRT
builder and every engine, so a name cannot drift between the exported graph and its callers.

Axes named "batch", "frames" and "samples" are dynamic; any other axis name is a fixed size of the
model ("mel", "text") taken from the model or from the ONNX graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from f5_triton.config import CUDA_GRAPH_FRAME_BUCKETS, DTYPES, HOP_LENGTH, parse_bool
from f5_triton.solvers import Solver

ENGINE_KINDS = ("torch", "onnxruntime", "tensorrt")
ENGINE_ALIASES = {"pytorch": "torch", "trt": "tensorrt"}  # upstream benchmark.py's --backend-type names
DYNAMIC_AXES = ("batch", "frames", "samples")


class EngineUnavailable(RuntimeError):
    """The configured engine cannot run here: missing package, file or GPU, or an unusable model file."""


class EngineFallbackWarning(RuntimeWarning):
    """A configured engine could not be loaded and the (slower) torch engine runs instead."""


class ShapeOutOfRange(ValueError):
    """Inputs fall outside the shapes an engine was built for (a TensorRT optimization profile)."""


def pad_axis(tensor: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """`tensor` with zeros (False for masks) appended along `axis` up to `length`; itself when already that long."""
    extra = length - tensor.shape[axis]
    if extra <= 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - 1 - axis) + [0, extra]
    return F.pad(tensor, pad, value=False if tensor.dtype == torch.bool else 0)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name of the CLI and model parameters (`config.DTYPES`: fp32, fp16, bf16)."""
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a network: name, dtype as the torch module sees it, and named axes."""

    name: str
    dtype: torch.dtype
    axes: tuple[str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        """{axis index: axis name} of the dynamic axes, the layout torch.onnx.export expects."""
        return {i: axis for i, axis in enumerate(self.axes) if axis in DYNAMIC_AXES}

    def axis(self, name: str) -> int | None:
        return self.axes.index(name) if name in self.axes else None


@dataclass(frozen=True)
class NetworkSpec:
    """The signature of one network, shared by its torch module, its ONNX graph and its engines."""

    name: str  # also the file stem: dit_step.onnx, dit_step.plan
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    samples_per_frame: int = 1  # length of a "samples" axis per frame
    frames_without_samples: int = 0  # frames a "samples" axis lacks (a centred ISTFT: one, half a window each end)
    batch_per_request: int = 1  # batch rows one request takes (2 for the DiT step: classifier-free guidance)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def onnx_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def plan_file(self) -> str:
        return f"{self.name}.plan"

    def samples(self, frames):
        """Length of the "samples" axis for `frames` frames (an int, or a tensor of per-item frames)."""
        kept = frames - self.frames_without_samples
        return (kept.clamp(min=0) if torch.is_tensor(kept) else max(kept, 0)) * self.samples_per_frame

    def check(self, inputs: Sequence[torch.Tensor]) -> None:
        """Raise TypeError/ValueError unless `inputs` are this network's tensors, in order, with the right ranks."""
        if len(inputs) != len(self.inputs):
            raise TypeError(f"{self.name} takes {len(self.inputs)} tensors {self.input_names}, got {len(inputs)}")
        for spec, tensor in zip(self.inputs, inputs):
            if not torch.is_tensor(tensor):
                raise TypeError(f"{self.name}: input {spec.name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.ndim != len(spec.axes):
                raise ValueError(f"{self.name}: input {spec.name!r} must be {list(spec.axes)}, "
                                 f"got shape {tuple(tensor.shape)}")

    def sizes(self, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        """The dynamic sizes ("batch", "frames", "samples") of a call, read from its inputs."""
        sizes: dict[str, int] = {}
        for spec, tensor in zip(self.inputs, inputs):
            for axis, name in spec.dynamic_axes().items():
                sizes.setdefault(name, int(tensor.shape[axis]))
        if "frames" in sizes:
            sizes.setdefault("samples", self.samples(sizes["frames"]))
        return sizes

    def pad_frames(self, inputs: Sequence[torch.Tensor], frames: int) -> list[torch.Tensor]:
        """Zero-pad (False for masks) every input's frames axis to `frames` (`pad_axis`).

        The networks keep padded frames out of valid ones (the DiT through its mask, the vocoder
        through its lengths), so the valid part of the output does not change.
        """
        padded = []
        for spec, tensor in zip(self.inputs, inputs):
            axis = spec.axis("frames")
            if axis is not None and frames < tensor.shape[axis]:
                raise ValueError(f"{self.name}: cannot pad {spec.name!r} of {tensor.shape[axis]} frames to {frames}")
            padded.append(tensor if axis is None else pad_axis(tensor, axis, frames))
        return padded

    def trim_frames(self, output: torch.Tensor, frames: int, index: int = 0) -> torch.Tensor:
        """Cut a padded output back to `frames` frames (the inverse of `pad_frames`)."""
        spec = self.outputs[index]
        for name, length in (("frames", frames), ("samples", self.samples(frames))):
            axis = spec.axis(name)
            if axis is not None:
                output = output.narrow(axis, 0, length)
        return output


DIT_STEP = NetworkSpec(
    name="dit_step",
    inputs=(
        TensorSpec("x", torch.float32, ("batch", "frames", "mel")),  # noisy mel at time t
        TensorSpec("cond", torch.float32, ("batch", "frames", "mel")),  # reference mel, zero elsewhere
        TensorSpec("text_embed", torch.float32, ("batch", "frames", "text")),  # DiT.embed_text output
        TensorSpec("time", torch.float32, ("batch",)),  # flow time in [0, 1]
        TensorSpec("mask", torch.bool, ("batch", "frames")),  # True = valid frame
    ),
    outputs=(TensorSpec("flow", torch.float32, ("batch", "frames", "mel")),),
    batch_per_request=2,
)

VOCODER = NetworkSpec(
    name="vocoder",
    inputs=(
        TensorSpec("mel", torch.float32, ("batch", "mel", "frames")),
        # Frames of each item: a padded batch then decodes every item exactly as if it were alone.
        TensorSpec("lengths", torch.int64, ("batch",)),
    ),
    outputs=(TensorSpec("waveform", torch.float32, ("batch", "samples")),),
    samples_per_frame=HOP_LENGTH,
    frames_without_samples=1,  # config.vocoder_samples: (frames - 1) * hop
)

NETWORKS: dict[str, NetworkSpec] = {spec.name: spec for spec in (DIT_STEP, VOCODER)}
DIT_INPUTS, DIT_OUTPUTS = DIT_STEP.input_names, DIT_STEP.output_names
VOCODER_INPUTS, VOCODER_OUTPUTS = VOCODER.input_names, VOCODER.output_names


@dataclass
class EngineConfig:
    """Which engine runs a network, and its options.

    kind: "torch" (eager, optionally compiled / CUDA graphs), "onnxruntime" (path to a .onnx file)
    or "tensorrt" (path to a .plan file). With `fallback` an engine that cannot be loaded is replaced
    by the torch engine with a loud warning; without it loading raises `EngineUnavailable`.
    """

    kind: str = "torch"
    path: str | Path | None = None
    device: str = "cpu"
    fallback: bool = True
    # torch engine (GPU only; ignored on the CPU)
    compile: bool = False
    cuda_graphs: bool = False
    frame_buckets: tuple[int, ...] = CUDA_GRAPH_FRAME_BUCKETS  # CUDA graphs pad frames up to these
    graph_steps: int = 8  # with cuda_graphs: ODE steps per graph replay of the sampler (0: a graph per DiT call)
    # with cuda_graphs: larger batches (network rows; the DiT takes 2 per request) run without graphs. Their
    # kernels are long enough to hide the launches, and every (rows, bucket) graph is a capture stall under load.
    graph_max_rows: int = 8
    # with cuda_graphs: packed DiT batches (those above graph_max_rows) of up to this many tokens replay graphs too
    # (0: none). Small packed steps wait on the host's launches; large ones keep the GPU busy without graphs.
    graph_max_tokens: int = 0
    # onnxruntime engine: execution providers, default CUDA (+CPU) on a GPU device, else CPU
    providers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        self.frame_buckets = tuple(sorted(int(b) for b in self.frame_buckets))
        if self.graph_steps < 0:
            raise ValueError(f"graph_steps must be >= 0, got {self.graph_steps}")
        if self.graph_max_rows < 1:
            raise ValueError(f"graph_max_rows must be >= 1, got {self.graph_max_rows}")
        if self.graph_max_tokens < 0:
            raise ValueError(f"graph_max_tokens must be >= 0, got {self.graph_max_tokens}")
        if self.providers is not None:
            self.providers = tuple(self.providers)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from field names to strings or typed values: "true", "256,512", ... (`from_settings` reads
        these from a command's options; a model's serving document gives typed values)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = dict(values)
        for name in ("fallback", "compile", "cuda_graphs"):
            if name in kwargs:
                kwargs[name] = parse_bool(kwargs[name])
        for name in ("graph_steps", "graph_max_rows", "graph_max_tokens"):
            if name in kwargs:
                kwargs[name] = int(kwargs[name])
        for name in ("frame_buckets", "providers"):
            if isinstance(kwargs.get(name), str):
                kwargs[name] = tuple(p.strip() for p in kwargs[name].split(",") if p.strip())
        if "path" in kwargs and kwargs["path"] in ("", None):
            kwargs["path"] = None
        if "kind" in kwargs:
            kwargs["kind"] = ENGINE_ALIASES.get(kwargs["kind"], kwargs["kind"])
        return cls(**kwargs)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], network: str, device: str) -> "EngineConfig":
        """The engine of `network` ("dit" or "vocoder") on `device`, from flat settings named as the
        commands' options: `<network>_engine`, `<network>_engine_path`,
        `<network>_compile`, `<network>_cuda_graphs`, `<network>_graph_steps`, `<network>_graph_max_rows`,
        `<network>_graph_max_tokens` and
        `engine_fallback`. Values are strings or typed; a setting absent or None keeps the field's default."""
        names = {"kind": f"{network}_engine", "path": f"{network}_engine_path", "fallback": "engine_fallback",
                 **{name: f"{network}_{name}" for name in ("compile", "cuda_graphs", "graph_steps", "graph_max_rows",
                                                    "graph_max_tokens")}}
        return cls.from_mapping({"device": device, **{field: settings[key] for field, key in names.items()
                                                      if settings.get(key) is not None}})


@runtime_checkable
class Engine(Protocol):
    """Runs one network: `engine(*inputs)` with `spec.input_names` in order -> the output tensor.

    For the DiT step an engine also says how the sampler should use it (`DiTRunner` passes these on as its
    `sampler.StepModel`): `solver`, its own ODE integration or None (the sampler loops over the step); `packs`,
    whether a batch of so many sequences goes packed; `cover_shapes`, preparing every shape a server meets. The
    defaults are an engine of an exported graph's: no solver, padded batches, nothing to prepare.
    """

    kind: str
    spec: NetworkSpec
    device: torch.device
    solver: Solver | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...

    def packs(self, sequences: int) -> bool:
        """Whether a DiT step over `sequences` sequences should run packed (a `Packing` in place of the mask)."""
        return False

    def cover_shapes(self, max_rows: int, max_frames: int, total_steps: int, mel_dim: int, text_dim: int,
                     log: Callable[[str], None] | None = None) -> int:
        """Prepare now every shape that solves of up to `max_rows` rows, `max_frames` frames and `total_steps` ODE
        steps can meet; returns how many were made."""
        return 0


def require_file(config: EngineConfig, spec: NetworkSpec, suffix: str) -> Path:
    """The engine file named by `config.path`, or EngineUnavailable saying what to run to make it."""
    if config.path is None:
        raise EngineUnavailable(f"{config.kind} engine for {spec.name} needs a path to its {suffix} file")
    path = Path(config.path)
    if not path.is_file():
        maker = "scripts/export_onnx.py" if suffix == ".onnx" else "scripts/build_engines.py"
        raise EngineUnavailable(f"{path} does not exist (make it with {maker})")
    return path
