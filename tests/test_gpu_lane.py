"""The production GPU path against the fp32 eager reference (which the CPU suite ties to upstream), in process.

fp16, torch.compile, CUDA graphs replayed for real, FlashAttention-4, packed mixed-length batches of 1 to 16
requests, and the streaming scheduler over that solver, on a random checkpoint of the real F5TTS_v1_Base
architecture (the production shapes and kernels). Flow matching and its vocoder are built from the settings
that the project's renderer writes for a `--target gpu` repository, through the factories the Triton models call.
Tolerances: `benchmarks.bench.FP16_MEL_REL_L2` / `FP16_WAVE_REL_L2` (justified there). Marker `gpu`: skipped
without CUDA; the GPU lane (scripts/gpu_lane.sh tests) runs it with FA4 installed, where a skip is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench, soak
from f5_triton.config import SAMPLE_RATE

pytestmark = pytest.mark.gpu
NFE = 16  # the published benchmarks' steps: two replays of 8-step graphs
ARCH = "F5TTS_v1_Base"
BATCH_SIZES = (1, 2, 4, 8, 15, 16)  # 1: padded graphs; 2-15: packed graphs where tokens fit; 16: packed, no graph


def record(**figures) -> None:
    """Add figures to $GPU_LANE_OUT/figures.json (the lane's result file reads them); nothing without it."""
    folder = os.environ.get("GPU_LANE_OUT")
    if not folder:
        return
    path = Path(folder) / "figures.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **figures}, indent=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from f5_triton.checkpoints import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("base"), ARCH, vocoder_small=False)


def repository_options(checkpoint: Path, **options):
    from f5_triton.repository import RepositoryOptions

    return RepositoryOptions(target="gpu", ckpt=checkpoint / "model.safetensors", vocab=checkpoint / "vocab.txt",
                             vocoder=checkpoint / "vocos", arch=ARCH, nfe_steps=NFE, **options)


@pytest.fixture(scope="module")
def flow_params(checkpoint, tmp_path_factory):
    """flow_matching's settings as the renderer writes them for the gpu target (fp16, compile, CUDA graphs,
    packed graphs up to its token limit, the vocoder in the same process)."""
    from conftest import rendered_settings
    from f5_triton.repository import render

    repo = render(repository_options(checkpoint), tmp_path_factory.mktemp("gpu_repo") / "model_repo")
    settings = rendered_settings(repo, "flow_matching")
    assert (settings.weights.dtype, settings.dit_engine["compile"], settings.dit_engine["cuda_graphs"],
            settings.placement.vocode) == ("fp16", True, True, True)
    return settings


def build(settings):
    from f5_triton.serving import factories

    return factories.load_flow_matcher(settings, "cuda:0"), factories.load_flow_vocoder(settings, "cuda:0")


@pytest.fixture(scope="module")
def production(flow_params):
    from f5_triton.model import fa4

    if not fa4.works(torch.device("cuda"), torch.float16):
        pytest.skip("flash-attn-4 does not run here (the GPU lane installs it: this skip fails the lane)")
    flow, vocoder = build(flow_params)
    assert flow.model.model.kernels.packed == flow.model.model.kernels.padded == "fa4"
    return flow, vocoder


@pytest.fixture(scope="module")
def reference(flow_params):
    """The same checkpoint fp32 eager (no TF32): the reference the CPU suite ties to upstream."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return build(dataclasses.replace(flow_params, weights=dataclasses.replace(flow_params.weights, dtype="fp32"),
                                     dit_engine={**flow_params.dit_engine, "compile": False, "cuda_graphs": False}))


def requests(count: int, short: bool, first_seed: int):
    """Mixed lengths: the benchmarks' mixed set (3-10 s references, 2-20 s of speech), or the soak's short ones."""
    from f5_triton.request import validate_request

    items = soak.mixed_items(bench.synthetic_reference(5.0), SAMPLE_RATE, count * 3)[::3] if short \
        else bench.mixed_items(count)
    return [validate_request(item.wave, item.reference_text, item.target_text, sample_rate=item.sample_rate,
                             nfe_steps=NFE, seed=first_seed + i) for i, item in enumerate(items[:count])]


def jobs_of(checkpoint, synthesis_requests):
    from f5_triton.pipeline import Preprocessor
    from f5_triton.text import Tokenizer

    preprocess = Preprocessor(Tokenizer(checkpoint / "vocab.txt"))
    jobs = []
    for index, request in enumerate(synthesis_requests):
        for job in preprocess(request).jobs:
            job.request_index = index
            jobs.append(job)
    return jobs


def test_production_path_matches_fp32_eager_on_mixed_batches(checkpoint, production, reference):
    flow, vocoder = production
    ref_flow, ref_vocoder = reference
    worst = {"mel": 0.0, "wave": 0.0}
    for size in BATCH_SIZES:
        jobs = jobs_of(checkpoint, requests(size, short=size in (4, 8, 15), first_seed=100 * size))
        mels, expected = flow(jobs), ref_flow(jobs)
        waves, expected_waves = vocoder(mels), ref_vocoder(expected)
        for job, mel, ref, wave, ref_wave in zip(jobs, mels, expected, waves, expected_waves):
            mel_err, wave_err = bench.rel_l2(mel.cpu(), ref.cpu()), bench.rel_l2(wave, ref_wave)
            worst["mel"], worst["wave"] = max(worst["mel"], mel_err), max(worst["wave"], wave_err)
            assert mel_err <= bench.FP16_MEL_REL_L2, (size, job.total_frames, mel_err)
            assert wave_err <= bench.FP16_WAVE_REL_L2, (size, job.total_frames, wave_err)
    graphs = flow.model.engine.solver.graphs
    assert any(key[0] == "packed" for key in graphs) and any(key[0] != "packed" for key in graphs), list(graphs)
    record(accuracy_worst_mel_rel_l2=worst["mel"], accuracy_worst_wave_rel_l2=worst["wave"],
           accuracy_graphs_captured=len(graphs))


def test_streaming_scheduler_with_the_production_solver_matches_fp32_eager(checkpoint, production, reference):
    """8 paragraphs streamed together through `StreamScheduler` (cohort rounds of graph segments) against each
    stream alone through the fp32 eager synthesizer: every piece within the waveform tolerance."""
    from f5_triton.pipeline import Preprocessor, Stages
    from f5_triton.request import validate_request
    from f5_triton.config import PacingConfig
    from f5_triton.stream_scheduler import StreamScheduler
    from f5_triton.streaming import StreamingSynthesizer
    from f5_triton.text import StreamingChunker, Tokenizer

    preprocess = Preprocessor(Tokenizer(checkpoint / "vocab.txt"), chunker=StreamingChunker())
    streamer, ref_streamer = (StreamingSynthesizer(Stages(preprocess, *pair)) for pair in (production, reference))
    items = bench.paragraph_items(8)
    synthesis = [validate_request(i.wave, i.reference_text, i.target_text, sample_rate=i.sample_rate, nfe_steps=NFE,
                                  seed=500 + n) for n, i in enumerate(items)]
    got: dict[int, list[np.ndarray]] = {}
    # accuracy, not pacing: every stream starts at once (pacing would hold some back while rounds still compile)
    with StreamScheduler(streamer, granularity="cohort", max_streams=16,
                         pacing=PacingConfig(enabled=False)).start() as scheduler:
        def run(index):
            got[index] = [piece.audio for piece in scheduler.stream(synthesis[index])]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(synthesis))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    worst = 0.0
    several = 0  # streams of more than one piece (the set's first paragraph is one short sentence: one piece)
    for index, request in enumerate(synthesis):
        expected = [piece.audio for piece in ref_streamer.stream(request)]
        assert len(got[index]) == len(expected)
        several += len(expected) > 1
        for piece, ref in zip(got[index], expected):
            worst = max(worst, bench.rel_l2(piece, ref))
            assert bench.rel_l2(piece, ref) <= bench.FP16_WAVE_REL_L2, (index, bench.rel_l2(piece, ref))
    assert several >= 6, several  # cohorts of later chunks were exercised, not only first chunks
    record(streaming_worst_wave_rel_l2=worst)
