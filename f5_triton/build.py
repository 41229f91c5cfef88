"""What run.sh's stages 0-3 make, each made again only when it is stale: the checkpoint (stage 0), the
ONNX files and TensorRT plans of the DiT step and the vocoder (stages 1-2), the rendered model repository
(stage 3). `f5-triton build ...` (f5_triton.cli) runs these functions; run.sh only picks the stages.

* A finished output has a stamp beside it (``OUTPUT.stamp``) holding the settings it was made with: it is
  up to date while the stamp records the same settings and none of its inputs changed since (a file not
  older than the stamp, a folder with anything newer than the stamp).
* Outputs are written in a staging folder and moved into place, the stamp last, under an exclusive lock
  of their folder (``.lock``): several pods may share one engine cache volume.
* TensorRT plans run only on the GPU model and TensorRT version they were built with: they are cached
  under :func:`engine_key` (TensorRT-RTX plans are portable and keyed by their version alone).

Heavy imports (torch, TensorRT, the exporters) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from f5_triton.config import DEFAULT_LIMITS
from f5_triton.errors import CheckpointError
from f5_triton.model_paths import find_vocoder

Log = Callable[[str], None]

RANDOM_ARCH = "tiny"  #: the architecture of --random-weights checkpoints
PRECISIONS = ("fp16", "fp32")  #: plans take their precision from the ONNX file they are built from
NETWORK_NAMES = ("dit_step", "vocoder")


class BuildError(RuntimeError):
    """A stage cannot make its output; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# stamps, locks, staging


@dataclass(frozen=True)
class Stamp:
    """``OUTPUT.stamp``: the settings ``output`` was made with."""

    output: Path
    settings: str

    @property
    def path(self) -> Path:
        return self.output.with_name(self.output.name + ".stamp")

    def up_to_date(self, inputs: Iterable[Path]) -> bool:
        """The output exists, the stamp records these settings, and no input changed since the stamp."""
        try:
            if not self.output.exists() or self.path.read_text() != self.settings:
                return False
            made = self.path.stat().st_mtime_ns
        except OSError:
            return False
        return all(_unchanged_since(Path(p), made) for p in inputs)

    def write(self) -> None:
        self.path.write_text(self.settings)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _unchanged_since(path: Path, mtime_ns: int) -> bool:
    """A file older than ``mtime_ns``; a folder with nothing in it (itself included) newer than it."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in [".", *dirs, *files]:
                with contextlib.suppress(OSError):
                    if (Path(root) / name).stat().st_mtime_ns > mtime_ns:
                        return False
        return True
    try:
        return path.stat().st_mtime_ns < mtime_ns
    except OSError:
        return False


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (made if missing) while the block runs."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A fresh ``folder/.tmp.*`` that is removed afterwards, whatever was left in it."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp.", dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make(stamp: Stamp, inputs: Sequence[Path], folder: Path, produce: Callable[[Path], None], log: Log) -> bool:
    """Make ``stamp.output`` with ``produce(staging folder)`` unless it is up to date; True if it was made.

    ``produce`` moves what it made into place; the stamp is written after it returned.
    """
    with locked(folder):
        if stamp.up_to_date(inputs):
            log(f"{stamp.output} is up to date")
            return False
        stamp.clear()
        with staging(folder) as tmp:
            produce(tmp)
        stamp.write()
        log(f"wrote {stamp.output}")
        return True


# ---------------------------------------------------------------------------------------------
# stage 0: checkpoints


@dataclass(frozen=True)
class ModelFiles:
    """A checkpoint folder's newest checkpoint, its vocab and its Vocos folder."""

    ckpt: Path
    vocab: Path
    vocoder: Path

    @classmethod
    def find(cls, model_dir: Path) -> ModelFiles | None:
        """The files in ``model_dir`` (Vocos in it or beside it), or None if any is missing."""
        from f5_triton.checkpoints import find_checkpoint

        vocoder = find_vocoder(model_dir)
        try:
            ckpt = find_checkpoint(model_dir)
        except CheckpointError:
            return None
        vocab = model_dir / "vocab.txt"
        return cls(ckpt, vocab, vocoder.resolve()) if vocoder is not None and vocab.is_file() else None

    @classmethod
    def require(cls, model_dir: Path, hint: str = "run stage 0") -> ModelFiles:
        files = cls.find(model_dir)
        if files is None:
            raise BuildError(f"no checkpoint in {model_dir} (model_*.safetensors|pt, vocab.txt, Vocos); {hint}")
        return files


def prepare_checkpoint(model: str, ckpt_dir: Path, model_dir: Path, random_weights: bool = False,
                       log: Log = print) -> ModelFiles:
    """Stage 0: the checkpoint in ``model_dir`` -- found, a random one written, or ``model`` downloaded."""
    files = ModelFiles.find(model_dir)
    if files is not None:
        log(f"checkpoint found in {model_dir}")
        return files
    if random_weights:
        from f5_triton.checkpoints import make_random_checkpoint

        log(f"writing a random '{RANDOM_ARCH}' checkpoint to {model_dir} (NOT speech)")
        make_random_checkpoint(model_dir, RANDOM_ARCH)
        return ModelFiles.require(model_dir)
    if model_dir != ckpt_dir / model:
        raise BuildError(f"MODEL_DIR={model_dir} holds no checkpoint (model_*.safetensors|pt, vocab.txt, Vocos)")
    writable = os.access(ckpt_dir, os.W_OK) if ckpt_dir.is_dir() else (
        not ckpt_dir.exists() and os.access(ckpt_dir.parent, os.W_OK))
    if not writable:
        raise BuildError(
            f"no checkpoint in {model_dir}, and {ckpt_dir} is not writable (a read-only mount?): nothing can be\n"
            "  downloaded there. Download first (Docker: docker compose --profile download run --rm download),\n"
            "  or mount it writable, or point MODEL_DIR at a folder with the checkpoint")
    from f5_triton.checkpoints import download_official

    log(f"downloading {model} and Vocos into {ckpt_dir}")
    try:
        download_official(model, ckpt_dir)
    except RuntimeError as exc:
        raise BuildError(
            f"no checkpoint for {model} ({exc}).\n"
            "  Without network, put the published files in place and run again:\n"
            f"    {ckpt_dir}/{model}/model_<step>.safetensors and vocab.txt   (huggingface.co/SWivid/F5-TTS)\n"
            f"    {ckpt_dir}/vocos-mel-24khz/config.yaml and pytorch_model.bin (huggingface.co/charactr/vocos-mel-24khz)\n"
            "  or point MODEL_DIR at a folder that has them (Vocos in MODEL_DIR/vocos/ or beside it).\n"
            "  To try the whole path without any download: bash run.sh serve --random-weights "
            "(output is noise, not speech)") from None
    return ModelFiles.require(model_dir)


# ---------------------------------------------------------------------------------------------
# machine: backend, engine cache key


def have_gpu() -> bool:
    """An NVIDIA GPU is visible (nvidia-smi lists one), or this is a Jetson (its iGPU; nvidia-smi may be missing)."""
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0:
                return True
    return Path("/etc/nv_tegra_release").exists()


def choose_backend(backend: str = "auto", target: str | None = None) -> tuple[str, str]:
    """(backend, target): trt when a GPU and a TensorRT that runs on it are present, else torch; the target is
    gpu for trt or when a GPU is present, else cpu. Given values are kept, and checked."""
    if backend not in ("auto", "torch", "trt"):
        raise BuildError(f"--backend must be torch or trt, got '{backend}'")
    if target not in (None, "", "cpu", "gpu"):
        raise BuildError(f"--target must be cpu or gpu, got '{target}'")
    gpu = None
    if backend == "auto":
        gpu = have_gpu()
        backend = "torch"
        if gpu:
            from f5_triton.engines.tensorrt_engine import runs_here

            backend = "trt" if runs_here() else "torch"
    if not target:
        target = "gpu" if backend == "trt" or (have_gpu() if gpu is None else gpu) else "cpu"
    if backend == "trt" and target != "gpu":
        raise BuildError("the trt backend runs on a GPU; use --backend torch for --target cpu")
    return backend, target


def engine_key(device: int = 0) -> str:
    """`<gpu name>-sm<major><minor>-trt<version>`, or `portable-trtrtx<version>` for TensorRT-RTX plans,
    with anything but [A-Za-z0-9._] turned into `_`.

    Raises:
        BuildError: no CUDA GPU, and no TensorRT-RTX (whose plans need none).
    """
    from f5_triton.engines.base import EngineUnavailable
    from f5_triton.engines.tensorrt_engine import flavour_of, import_tensorrt

    try:
        trt = import_tensorrt()
    except EngineUnavailable:  # the key still names the GPU; the build itself will say what is missing
        trt = None
    if trt is not None and flavour_of(trt) == "tensorrt-rtx":
        return f"portable-trtrtx{trt.__version__}"
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU visible: TensorRT engines are built and cached per GPU model "
                         "(TensorRT-RTX builds portable plans without a GPU: pip install tensorrt-rtx)")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    version = "none" if trt is None else trt.__version__
    return re.sub(r"[^A-Za-z0-9._]+", "_", f"{name}") + f"-sm{major}{minor}-trt{version}"


def engine_dir(engine_root: Path, label: str) -> Path:
    """Where this machine's plans of model ``label`` are cached: ENGINE_ROOT/<label>/<engine key>."""
    return engine_root / label / engine_key()


def engine_batches(max_batch_size: int | None = None) -> dict[str, int]:
    """Requests per batch that the plans must take: the flow-matching batch of the rendered repository
    (``max_batch_size``, else the repository's GPU default) for the DiT step, its vocoder batch for Vocos."""
    from f5_triton.repository import RepositoryOptions

    options = RepositoryOptions("gpu", Path(), Path(), Path(), max_batch_size=max_batch_size or None)
    return {"dit_step": int(options.max_batch_size), "vocoder": options.vocoder_max_batch_size}


def plan_flavour(engines: Path) -> str:
    """The TensorRT flavour that built the vocoder plan in ``engines`` (tensorrt | tensorrt-rtx)."""
    info = engines / "build_info.vocoder.json"
    return json.loads(info.read_text())["vocoder"]["flavour"] if info.is_file() else "tensorrt"


# ---------------------------------------------------------------------------------------------
# stages 1-2: ONNX files and TensorRT plans


def onnx_suffix(precision: str) -> str:
    return "" if precision == "fp32" else f".{precision}"


def export_onnx(network: str, files: ModelFiles, onnx_dir: Path, precision: str = "fp16", arch: str | None = None,
                log: Log = print) -> Path:
    """ONNX_DIR/<network>[.fp16].onnx from the checkpoint (fp16 also writes the fp32 file), unless up to date."""
    out = onnx_dir / f"{network}{onnx_suffix(precision)}.onnx"
    inputs = [files.ckpt, files.vocab] if network == "dit_step" else [files.vocoder]

    def produce(tmp: Path) -> None:
        from f5_triton.export.onnx_export import MANIFEST_FILE, ExportError, export_checkpoint

        try:
            export_checkpoint(files.ckpt, files.vocab, files.vocoder, tmp, networks=[network], arch=arch,
                              fp16=precision != "fp32", log=log)
        except (ExportError, CheckpointError, ValueError) as exc:
            raise BuildError(f"ONNX export of {network} failed: {exc}") from exc
        # external-data files (if the exporter wrote any) first, the .onnx itself last
        for file in tmp.iterdir():
            if file.name == MANIFEST_FILE:
                os.replace(file, onnx_dir / f"export_info.{network}.json")
            elif file.name != out.name:
                os.replace(file, onnx_dir / file.name)
        os.replace(tmp / out.name, out)

    make(Stamp(out, f"export {network} {precision}"), inputs, onnx_dir, produce, log)
    return out


def build_plan(network: str, onnx_dir: Path, engines: Path, requests: int, precision: str = "fp16",
               max_frames: int = DEFAULT_LIMITS.max_mel_frames, workspace_gib: float = 4.0, log: Log = print) -> Path:
    """ENGINE_DIR/<network>.plan from its ONNX file, for up to ``requests`` requests, unless up to date."""
    out = engines / f"{network}.plan"
    suffix = onnx_suffix(precision)
    settings = f"--max-requests {requests} --max-frames {max_frames} --workspace-gib {workspace_gib:g}"
    if suffix:
        settings += f" --onnx-suffix {suffix}"

    def produce(tmp: Path) -> None:
        from f5_triton.engines.base import EngineUnavailable
        from f5_triton.export.tensorrt_build import BUILD_INFO_FILE, BuildOptions, ShapeRange, build_engines

        log(f"building the {network} TensorRT engine (minutes; cached in {engines})")
        options = BuildOptions(requests=ShapeRange(1, 1, requests),
                               frames=ShapeRange(1, min(1024, max_frames), max_frames),
                               workspace_gib=workspace_gib, timing_cache=engines / "timing.cache")
        try:
            build_engines(onnx_dir, tmp, [network], options, suffix, log=log)
        except EngineUnavailable as exc:
            raise BuildError(f"cannot build TensorRT engines: {exc}") from None
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            raise BuildError(f"TensorRT build of {network} failed: {exc}") from exc
        os.replace(tmp / BUILD_INFO_FILE, engines / f"build_info.{network}.json")
        os.replace(tmp / out.name, out)

    make(Stamp(out, settings), [onnx_dir / f"{network}{suffix}.onnx"], engines, produce, log)
    return out


# ---------------------------------------------------------------------------------------------
# stage 3: the model repository


@dataclass(frozen=True)
class RepositorySettings:
    """What run.sh's variables say about the repository (stage 3); see :meth:`arguments`."""

    backend: str  # torch | trt
    target: str  # cpu | gpu
    arch: str | None = None
    engines: Path | None = None  # trt: the folder of dit_step.plan and vocoder.plan
    max_batch_size: int | None = None
    nfe: int | None = None
    dtype: str | None = None
    gpus: str | None = None
    flow_instances: int | None = None
    extra: tuple[str, ...] = ()  # further scripts/build_model_repo.py arguments (REPO_ARGS)

    def arguments(self, model_dir: Path) -> tuple[list[str], list[Path]]:
        """(scripts/build_model_repo.py arguments without --output, the files they depend on beyond the
        checkpoint and the templates)."""
        args = ["--ckpt-dir", str(model_dir), *(["--arch", self.arch] if self.arch else [])]
        plans: list[Path] = []
        if self.backend == "trt":
            if self.engines is None:
                raise BuildError("the trt backend needs the engine folder")
            plans = [self.engines / "dit_step.plan", self.engines / "vocoder.plan"]
            batch = str(engine_batches(self.max_batch_size)["dit_step"])
            if plan_flavour(self.engines) == "tensorrt-rtx":
                # Triton's TensorRT backend (the image's libnvinfer) cannot load TensorRT-RTX plans: both run
                # in python models
                args += ["--target", "gpu", "--max-batch-size", batch, "--dit-engine", "tensorrt",
                         "--dit-engine-path", str(plans[0]), "--vocoder-engine", "tensorrt",
                         "--vocoder-engine-path", str(plans[1])]
            else:
                args += ["--target", "trt", "--max-batch-size", batch, "--dit-engine-path", str(plans[0]),
                         "--vocoder-plan", str(plans[1])]
        else:
            args += ["--target", self.target]
            if self.max_batch_size:
                args += ["--max-batch-size", str(self.max_batch_size)]
        for flag, value in (("--nfe", self.nfe), ("--dtype", self.dtype), ("--gpus", self.gpus),
                            ("--flow-instances", self.flow_instances)):
            if value not in (None, ""):
                args += [flag, str(value)]
        return args + list(self.extra), plans


def render_repository(output: Path, model_dir: Path, settings: RepositorySettings, log: Log = print) -> Path:
    """Stage 3: render the model repository at ``output`` unless it is up to date."""
    import argparse

    from f5_triton import repository

    if output.resolve() == repository.TEMPLATES.resolve():
        raise BuildError(f"MODEL_REPO must not be {repository.TEMPLATES}: that folder holds the templates")
    files = ModelFiles.require(model_dir, f"run stage 0 (bash run.sh 0 0 {model_dir.name})")
    args, plans = settings.arguments(model_dir)
    inputs = [files.ckpt, files.vocab, repository.TEMPLATES, Path(repository.__file__), *plans]
    stamp = Stamp(output, " ".join(args))
    if stamp.up_to_date(inputs):
        log(f"{output} is up to date")
        return output
    parser = argparse.ArgumentParser(prog="f5-triton build repository", add_help=False)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--arch")
    repository.add_repository_arguments(parser)
    parsed = parser.parse_args(args)
    log(f"rendering the model repository at {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    stamp.clear()
    repository.render(repository.options_from_args(parsed, files.ckpt, files.vocab, files.vocoder), output)
    stamp.write()
    return output


def known_models() -> list[str]:
    """The published model names (the architectures less the test-only tiny one)."""
    from f5_triton.config import ARCHITECTURES

    return [name for name in ARCHITECTURES if name != RANDOM_ARCH]
