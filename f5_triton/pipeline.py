"""In-process F5-TTS: reference audio + texts -> speech, batched across requests.

The same stages run here for the CLI and the offline benchmark, and inside Triton as separate
models (preprocess -> flow_matching -> vocoder -> postprocess; on GPUs the Vocoder runs inside the
flow_matching model's process, right after it):

  Preprocessor   resample, level, mel, tokenize, split long text (its chunker), estimate durations
  FlowMatcher    flow matching for a batch of jobs (one job = one text chunk of one request)
  Vocoder        mel -> waveform for a batch of jobs
  finish()       restore the reference level, cross-fade the chunks of a request
  Stages         the three stage objects as one bundle, handed to whoever runs them (streaming and its scheduler)
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from f5_triton import audio, text
from f5_triton.config import DEFAULT_LIMITS, DEFAULT_SAMPLING, HOP_LENGTH, N_MELS, SAMPLE_RATE, Limits
from f5_triton.errors import InvalidInputError
from f5_triton.request import SynthesisRequest
from f5_triton.sampler import Solving, StepModel, prepare, sample


@dataclass
class Job:
    """One text chunk of one request: everything flow matching needs, on the CPU."""

    request_index: int
    chunk_index: int
    ref_mel: torch.Tensor  # [frames, n_mels] float32
    ref_frames: int  # reference length that durations and the output cut count in (samples // hop)
    tokens: list[int]  # reference text + chunk text
    duration: int  # total frames: reference + generated
    seed: int
    nfe_steps: int
    cfg_strength: float
    sway_sampling_coef: float

    @property
    def total_frames(self) -> int:
        """Frames flow matching really runs on: sample() lengthens a duration to at least
        reference + 1 and text + 1 frames, as upstream."""
        return max(self.duration, max(len(self.tokens), self.ref_mel.shape[0]) + 1)


@dataclass
class Prepared:
    """A request after preprocessing: its jobs and what the output stage needs to finish it."""

    jobs: list[Job]
    ref_rms: float
    chunks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reference:
    """What preprocessing makes of a reference prompt; shared (never mutated) when cached."""

    mel: torch.Tensor  # [frames, n_mels] float32, of the clipped, levelled, 24 kHz clip
    frames: int  # samples // hop of that clip
    seconds: float  # its length
    rms: float  # level of the clip before levelling
    text: str  # the transcript as the model sees it (`text.fix_reference_text`)

    @property
    def nbytes(self) -> int:
        return self.mel.numel() * self.mel.element_size() + len(self.text.encode("utf-8")) + 64


# (target text, max bytes per chunk) -> chunks; offline: text.chunk_text, as upstream's infer_process
Chunker = Callable[[str, int], list[str]]


class Preprocessor:
    """Request -> jobs: reference level and mel, tokens, text chunks, durations. CPU work.

    `chunker` cuts the target text: `text.chunk_text` (offline, as upstream's infer_process) or, for streams,
    a `text.StreamingChunker`. `cache` (an `f5_triton.cache.LRUCache`) keeps processed references by content hash,
    so a voice that comes back skips clipping, resampling and the mel. The tokens are not cached: upstream
    tokenizes reference + chunk as one string, and the boundary can change them ("。" + "Hi").
    """

    def __init__(self, tokenizer: text.Tokenizer, limits: Limits = DEFAULT_LIMITS, device: str | torch.device = "cpu",
                 cache=None, chunker: Chunker = text.chunk_text):
        self.tokenizer = tokenizer
        self.limits = limits
        self.device = torch.device(device)
        self.mel = audio.MelSpectrogram().to(self.device)
        self.cache = cache
        self.chunker = chunker

    def chunked_by(self, chunker: Chunker) -> "Preprocessor":
        """This preprocessor (tokenizer, limits, mel, reference cache shared) cutting texts with `chunker`."""
        other = copy.copy(self)
        other.chunker = chunker
        return other

    def reference(self, request: SynthesisRequest) -> Reference:
        """The processed reference of `request`, from the cache when it has one."""
        if self.cache is None:
            return self._process_reference(request)
        from f5_triton.cache import reference_key

        key = reference_key(request.reference_wav, request.sample_rate, request.reference_text)
        return self.cache.get_or_compute(key, lambda: self._process_reference(request), lambda r: r.nbytes)

    def _process_reference(self, request: SynthesisRequest) -> Reference:
        wave = audio.clip_reference(request.reference_wav, request.sample_rate,
                                    max_seconds=self.limits.clip_reference_seconds)
        wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).unsqueeze(0)
        wave, rms = audio.normalize_rms(wave)
        if request.sample_rate != SAMPLE_RATE:
            wave = audio.resample(wave, request.sample_rate, SAMPLE_RATE)
        with torch.inference_mode():
            ref_mel = self.mel(wave.to(self.device))[0].transpose(0, 1).float().cpu()
        return Reference(mel=ref_mel, frames=wave.shape[-1] // HOP_LENGTH, seconds=wave.shape[-1] / SAMPLE_RATE,
                         rms=float(rms), text=text.fix_reference_text(request.reference_text))

    def __call__(self, request: SynthesisRequest) -> Prepared:
        ref = self.reference(request)
        max_bytes = text.max_chunk_bytes(request.reference_text, ref.seconds, request.speed)
        chunks = self.chunker(request.target_text, max_bytes) or [request.target_text.strip()]
        seed = random.randrange(2**31) if request.seed is None else request.seed
        jobs = []
        for i, chunk in enumerate(chunks):
            duration = audio.estimate_duration(ref.frames, ref.text, chunk, request.speed)
            jobs.append(Job(
                request_index=-1, chunk_index=i, ref_mel=ref.mel, ref_frames=ref.frames,
                tokens=self.tokenizer.encode(ref.text + chunk), duration=duration,
                seed=(seed + i) % 2**63, nfe_steps=request.nfe_steps, cfg_strength=request.cfg_strength,
                sway_sampling_coef=request.sway_sampling_coef))
            self._check_frames(jobs[-1], chunk, len(chunks), ref.seconds, request.speed)
        return Prepared(jobs=jobs, ref_rms=ref.rms, chunks=chunks)

    def _check_frames(self, job: Job, chunk: str, chunks: int, ref_seconds: float, speed: float) -> None:
        """A job longer than the engines' shape profile is refused, never truncated.

        Chunks end at sentence marks only, so one long sentence (or a very slow speed) can still
        need more frames than `Limits.max_mel_frames`.
        """
        limit = self.limits.max_mel_frames
        if job.total_frames > limit:
            raise InvalidInputError(
                "target_text", f"text chunk {job.chunk_index + 1} of {chunks} ({len(chunk.encode('utf-8'))} bytes, "
                f"{chunk[:40]!r}...) needs {job.total_frames} mel frames together with the {ref_seconds:.1f} s "
                f"reference at speed {speed:g}; the limit is {limit} frames "
                f"({limit * HOP_LENGTH / SAMPLE_RATE:.1f} s): split long sentences with . ! ? or ;, use a shorter "
                "reference or a higher speed", "too_many_frames")


class FlowMatcher:
    """Jobs -> generated mels, batching jobs that share sampling settings. The heavy stage."""

    def __init__(self, model: StepModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model  # the DiT, or an engine runner (`engines.DiTRunner`)
        self.device = torch.device(device)
        self.dtype = dtype

    def __call__(self, jobs: list[Job], on_step=None, keep: Callable[[Job], bool] | None = None
                 ) -> list[torch.Tensor | None]:
        """Generated mel [frames, n_mels] (reference removed) for each job, in job order.

        on_step(i): called before every ODE step; an exception it raises ends the whole call.
        keep(job): asked before every ODE step for each job still running (cancellation, deadlines);
        a job it declines gets None instead of a mel, and a batch whose jobs are all declined stops
        at once. The other jobs of the batch go on and get the same mels as without the declined ones
        (per-job noise and masks).
        """
        results: list[torch.Tensor | None] = [None] * len(jobs)
        for members, batch, arguments in self._groups(jobs):
            declined: set[int] = set()
            hook = on_step if keep is None else _KeepHook(batch, keep, declined, on_step)
            try:
                mel = sample(self.model, **arguments, on_step=hook)
            except _AllDeclined:
                continue
            for i, (job, row) in enumerate(zip(batch, mel)):
                if i not in declined:
                    results[members[i]] = generated(job, row)
        return results

    def _groups(self, jobs: list[Job]):
        """(positions, jobs, `sampler.sample` arguments) of each group of jobs sharing sampling settings."""
        groups = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.nfe_steps, job.cfg_strength, job.sway_sampling_coef)].append(i)
        for (steps, cfg, sway), members in groups.items():
            batch = [jobs[i] for i in members]
            cond = torch.nn.utils.rnn.pad_sequence([j.ref_mel for j in batch], batch_first=True)
            tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(j.tokens, dtype=torch.long) for j in batch],
                                                     batch_first=True, padding_value=-1)
            yield members, batch, dict(
                cond=cond.to(self.device, self.dtype), text=tokens.to(self.device),
                duration=torch.tensor([j.duration for j in batch]), steps=steps, cfg_strength=cfg,
                sway_sampling_coef=sway, seed=[j.seed for j in batch],
                lens=torch.tensor([j.ref_mel.shape[0] for j in batch]))

    def synchronize(self) -> None:
        """Wait for the work queued on the device (a GPU runs it asynchronously): the stream scheduler times rounds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, jobs: list[Job]) -> list[tuple[list[int], Solving]]:
        """Jobs' flow matching to advance a few ODE steps at a time (`sampler.Solving`): one integration per group
        of sampling settings, with the positions of its jobs; a finished one's `result()` rows are the jobs' mels
        (reference included: `generated` cuts them)."""
        return [(members, Solving(self.model, prepare(self.model, **arguments)))
                for members, _, arguments in self._groups(jobs)]

    def warm_up(self, max_requests: int, nfe_steps: int = DEFAULT_SAMPLING.nfe_steps, longest: int = 1200,
                mel_dim: int = N_MELS, log: Callable[[str], None] | None = None,
                max_frames: int | None = None) -> list[torch.Tensor | None]:
        """Run synthetic batches once, so that `torch.compile` (graphs for any length: padded, packed small and
        packed large) and the CUDA-graph captures happen before a server reports ready, not during its first requests.

        Batches of 1, 2 (ragged: the masked path), `max_requests` and `max_requests - 1` jobs (packed when no
        graph covers them: two token counts, so the packed step compiles for any), of different lengths up to
        `longest` frames. With `max_frames`, the engine then prepares every other shape a batch of up to
        `max_requests` jobs of up to `max_frames` frames can take (`DiTRunner.cover_shapes`: all CUDA graphs).
        `log` hears about each batch as it finishes (a server is not ready for a minute or two on a GPU).
        Returns the batches' mels.
        """
        def job(frames: int, seed: int) -> Job:
            return Job(request_index=0, chunk_index=0, ref_mel=torch.zeros(frames // 3, mel_dim), ref_frames=frames // 3,
                       tokens=[1] * (frames // 8), duration=frames, seed=seed, nfe_steps=nfe_steps,
                       cfg_strength=DEFAULT_SAMPLING.cfg_strength,
                       sway_sampling_coef=DEFAULT_SAMPLING.sway_sampling_coef)

        results = []
        many = max(max_requests, 3)
        batches = ([longest], [longest * 3 // 4, longest * 5 // 6],
                   [longest // 2 + i * longest // (2 * many) for i in range(many)],
                   [longest // 3 + i * longest // (3 * many) for i in range(many - 1)])
        for number, lengths in enumerate(batches, 1):
            start = time.perf_counter()
            results += self([job(frames, seed) for seed, frames in enumerate(lengths)])
            if log is not None:
                log(f"warm-up batch {number}/{len(batches)}: {len(lengths)} requests, up to {max(lengths)} frames, "
                    f"{time.perf_counter() - start:.1f} s")
        if max_frames is not None:
            start = time.perf_counter()
            made = self.model.cover_shapes(max_requests, max_frames, nfe_steps, log)
            if log is not None:
                log(f"warm-up: every shape of up to {max_requests} requests x {max_frames} frames covered "
                    f"({made} more), {time.perf_counter() - start:.1f} s")
        return results


def generated(job: Job, mel: torch.Tensor) -> torch.Tensor:
    """The frames a job generated ([frames, n_mels] float32), out of its sampled mel (reference included)."""
    return mel[job.ref_frames:job.total_frames].float()


class _AllDeclined(Exception):
    """Every job of a batch was declined by `keep`: the batch stops."""


class _KeepHook:
    """FlowMatcher's step hook when a `keep` callback is given: records declined jobs (by position
    in the batch) and stops the batch once none is left."""

    def __init__(self, batch: list[Job], keep: Callable[[Job], bool], declined: set[int], on_step=None):
        self.batch, self.keep, self.declined, self.on_step = batch, keep, declined, on_step

    def __call__(self, step: int) -> None:
        for i, job in enumerate(self.batch):
            if i not in self.declined and not self.keep(job):
                self.declined.add(i)
        if len(self.declined) == len(self.batch):
            raise _AllDeclined
        if self.on_step is not None:
            self.on_step(step)


class Vocoder:
    """Mels -> waveforms, one padded batch; `decoder` is VocosDecoder or an engine runner."""

    def __init__(self, decoder, device: str | torch.device = "cpu"):
        self.decoder = decoder
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, mels: list[torch.Tensor]) -> list[np.ndarray]:
        from f5_triton.vocoder import decode_batch

        return decode_batch(self.decoder, [m.transpose(0, 1).to(self.device) for m in mels])


@dataclass(frozen=True)
class Stages:
    """The stage objects a host runs, made once (weights, engines, caches) and handed as one bundle to each object
    that runs them: `streaming.StreamingSynthesizer` and the `stream_scheduler.StreamScheduler` over it share one.
    How texts are cut is the preprocessor's `chunker`."""

    preprocess: Preprocessor
    flow_matching: FlowMatcher
    vocoder: Vocoder


def finish(waves: list[np.ndarray], ref_rms: float) -> np.ndarray:
    """A request's chunk waveforms -> one waveform at the reference's level."""
    joined = audio.cross_fade(waves) if len(waves) > 1 else waves[0]
    return np.asarray(audio.restore_rms(joined, ref_rms), dtype=np.float32)


class TTS:
    """The four stages in one process, for the CLI and the offline benchmark."""

    def __init__(self, model: StepModel, tokenizer: text.Tokenizer, decoder, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, limits: Limits = DEFAULT_LIMITS):
        self.preprocess = Preprocessor(tokenizer, limits)
        self.flow_matching = FlowMatcher(model, device, dtype)
        self.vocoder = Vocoder(decoder, device)

    @classmethod
    def from_paths(cls, ckpt: str | Path, vocab: str | Path, vocoder: str | Path, *, arch=None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32, engine=None, vocoder_engine=None,
                   **kwargs) -> "TTS":
        """Load a checkpoint, its vocab and a Vocos folder; `engine(dit)` / `vocoder_engine(decoder)` wrap them."""
        from f5_triton.checkpoints import load_dit
        from f5_triton.vocoder import VocosDecoder, load_vocos

        tokenizer = text.Tokenizer(vocab)
        model = load_dit(ckpt, tokenizer.vocab_size, arch=arch, device=device, dtype=dtype)
        if engine is not None:
            model = engine(model)
        decoder = VocosDecoder(load_vocos(vocoder, device=device)).to(device).eval()
        if vocoder_engine is not None:
            decoder = vocoder_engine(decoder)
        return cls(model, tokenizer, decoder, device=device, dtype=dtype, **kwargs)

    def stages(self, chunker: Chunker | None = None) -> Stages:
        """Its stages as a bundle (a stream's: `chunker=text.StreamingChunker()`), the preprocessor cutting texts
        with `chunker` when given; flow matching, the vocoder and the reference cache are this pipeline's."""
        preprocess = self.preprocess if chunker is None else self.preprocess.chunked_by(chunker)
        return Stages(preprocess, self.flow_matching, self.vocoder)

    def synthesize(self, requests: list[SynthesisRequest], stage=None) -> list[np.ndarray]:
        """All stages for a batch of validated requests; returns 24 kHz float32 waveforms.

        `stage(name)`, if given, is a context manager wrapped around each stage (the benchmark times them).
        """
        stage = stage or (lambda name: contextlib.nullcontext())
        with stage("preprocess"):
            prepared = [self.preprocess(r) for r in requests]
            jobs = []
            for index, p in enumerate(prepared):
                for job in p.jobs:
                    job.request_index = index
                    jobs.append(job)
        with stage("dit"):
            mels = self.flow_matching(jobs)
        with stage("vocoder"):
            waves = self.vocoder(mels)
        with stage("postprocess"):
            per_request: list[list[np.ndarray]] = [[] for _ in requests]
            for job, wave in zip(jobs, waves):
                per_request[job.request_index].append(wave)
            return [finish(w, p.ref_rms) for w, p in zip(per_request, prepared)]
