"""A whole synthesis equals upstream F5-TTS's own inference path, for the same weights and seed.

Upstream runs as its users run it: `preprocess_ref_audio_text` (pydub clipping, written to a wav) ->
`infer_process` (chunking, level raise, duration) -> `CFM.sample` -> `Vocos.decode`, on the CPU in fp32,
loaded with its own `load_model` / `load_vocoder` from a tiny random checkpoint in the official layout
with the official vocab and a Vocos folder with the published config. Its noise is the global RNG's
(`torch.manual_seed(seed)` right before the call), ours the request's seed: one chunk draws the same.

We run the same reference file and text through `f5-triton synth`, the in-process pipeline and the
Triton server. They must agree to within 16-bit wav quantization. Texts of several chunks run in
upstream's threads on the shared global RNG, so for them the chunk texts, tokens and durations
are compared instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import yaml

import upstream
from f5_triton.audio import read_audio
from f5_triton.config import SAMPLE_RATE
from f5_triton.request import validate_request

REF_TEXT_EN = "Some call me nature, others call me mother nature."
REF_TEXT_ZH = "对，这就是我，万人敬仰的太乙真人。"
QUANTUM = 2.0**-15  # one step of a 16-bit wav
NFE = 8  # fewer steps than the default 32 keep the tests quick; the grid logic is the same


@dataclass(frozen=True)
class Case:
    reference: str  # key of the `references` fixture
    text: str
    nfe_steps: int = NFE
    cfg_strength: float = 2.0
    speed: float = 1.0
    seed: int = 7
    options: dict = field(default_factory=dict)


CASES = {
    "english": Case("en", "I don't really care what you call me."),
    "chinese": Case("zh", "我们一起去公园散步吧，今天的天气真好。"),
    "quiet reference": Case("quiet", "I don't really care what you call me."),  # level raised, then restored
    "text under 10 bytes": Case("en", "Hi there."),  # upstream then runs at speed 0.3
    "speed 1.4": Case("en", "I don't really care what you call me.", speed=1.4),
    "nfe 7 with epss": Case("en", "I don't really care what you call me.", nfe_steps=7, seed=11),
    "16 kHz reference": Case("en 16 kHz", "I don't really care what you call me."),
    "cfg 1.3": Case("en", "I don't really care what you call me.", cfg_strength=1.3),
}
MULTI_CHUNK = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark green forest. "
    "Nobody knows where it went, but everyone agrees that it was the fastest fox they had ever seen in town. "
    "Some say it still lives there today; others think it moved to the mountains long ago with its family. "
    "Either way, the story is told to every child in the village before they go to sleep at night."
)


@pytest.fixture(scope="module")
def parity_ckpt(tmp_path_factory, official_vocab):
    from f5_triton.checkpoints import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("parity_ckpt"), "tiny", str(official_vocab), seed=3)


@pytest.fixture(scope="module")
def references(tmp_path_factory, ref_en, ref_zh) -> dict[str, tuple[str, str]]:
    """name -> (16-bit wav path, transcript): the shared clips, a quiet one and a 16 kHz one."""
    folder = tmp_path_factory.mktemp("parity_refs")
    wave, rate = sf.read(ref_en, dtype="float32")
    sf.write(folder / "quiet.wav", wave * 0.05, rate, subtype="PCM_16")
    wave_16k = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()
    sf.write(folder / "en_16k.wav", wave_16k, 16000, subtype="PCM_16")
    return {"en": (str(ref_en), REF_TEXT_EN), "zh": (str(ref_zh), REF_TEXT_ZH),
            "quiet": (str(folder / "quiet.wav"), REF_TEXT_EN), "en 16 kHz": (str(folder / "en_16k.wav"), REF_TEXT_EN)}


class Upstream:
    """Upstream's model, vocoder and inference functions, loaded by upstream's own code."""

    def __init__(self, ckpt):
        self.infer = upstream.load_infer()
        arch = yaml.safe_load((ckpt / "model.yaml").read_text())["model"]["arch"]
        dit = upstream.load("model.backbones.dit").DiT
        self.model = self.infer.load_model(dit, arch, str(ckpt / "model.safetensors"),
                                           vocab_file=str(ckpt / "vocab.txt"), device="cpu")
        self.vocoder = self.infer.load_vocoder("vocos", is_local=True, local_path=str(ckpt / "vocos"), device="cpu")

    def synthesize(self, ref_path: str, ref_text: str, case: Case) -> np.ndarray:
        quiet = lambda *args, **kwargs: None  # noqa: E731
        ref_audio, ref_text = self.infer.preprocess_ref_audio_text(ref_path, ref_text, show_info=quiet)
        torch.manual_seed(case.seed)
        wave, rate, _ = self.infer.infer_process(
            ref_audio, ref_text, case.text, self.model, self.vocoder, show_info=quiet, progress=None,
            nfe_step=case.nfe_steps, cfg_strength=case.cfg_strength, speed=case.speed, device="cpu")
        assert rate == SAMPLE_RATE
        return wave


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Both sides on one thread, as the servers' stubs run (and quicker on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def theirs(parity_ckpt):
    return Upstream(parity_ckpt)


@pytest.fixture(scope="module")
def expected(theirs, references) -> dict[str, np.ndarray]:
    """Upstream's audio for every single-chunk case, computed once."""
    return {name: theirs.synthesize(*references[case.reference], case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def tts(parity_ckpt):
    from f5_triton.pipeline import TTS

    return TTS.from_paths(parity_ckpt / "model.safetensors", parity_ckpt / "vocab.txt", parity_ckpt / "vocos")


def request(references, case: Case):
    path, ref_text = references[case.reference]
    wave, rate = read_audio(path)
    return validate_request(wave, ref_text, case.text, sample_rate=rate, seed=case.seed, nfe_steps=case.nfe_steps,
                            cfg_strength=case.cfg_strength, speed=case.speed)


def assert_same_audio(ours: np.ndarray, theirs: np.ndarray, tolerance: float = QUANTUM) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(theirs).max() > 10 * tolerance  # a real signal, not silence
    assert np.abs(ours - theirs).max() <= tolerance


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_equals_upstream(tts, references, expected, name):
    (ours,) = tts.synthesize([request(references, CASES[name])])
    assert_same_audio(ours, expected[name])


# The CLI reads and resamples the file itself: the 16 kHz case covers that path (every case runs in process above).
@pytest.mark.parametrize("name", ["16 kHz reference"])
def test_cli_equals_upstream(parity_ckpt, references, expected, tmp_path, name):
    case = CASES[name]
    path, ref_text = references[case.reference]
    out = tmp_path / "out.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "f5_triton.cli", "synth", "--ckpt-dir", str(parity_ckpt), "--ref-audio", path,
         "--ref-text", ref_text, "--text", case.text, "-o", str(out), "--nfe", str(case.nfe_steps),
         "--cfg", str(case.cfg_strength), "--speed", str(case.speed), "--seed", str(case.seed)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wave, rate = sf.read(out, dtype="float32")
    assert rate == SAMPLE_RATE
    assert_same_audio(wave, expected[name].astype(np.float32), tolerance=2 * QUANTUM)  # written as 16-bit


@pytest.fixture(scope="module")
def parity_server(tiny_server, parity_ckpt):
    with tiny_server(ckpt=parity_ckpt / "model.safetensors", vocab=parity_ckpt / "vocab.txt",
                     vocoder=parity_ckpt / "vocos") as server:
        yield server


@pytest.mark.server
def test_server_equals_upstream(parity_server, references, expected):
    from f5_triton.client import synthesize

    for name, case in CASES.items():
        path, ref_text = references[case.reference]
        wave, rate = read_audio(path)
        got = synthesize(parity_server.urls.grpc, wave, ref_text, case.text, protocol="grpc", sample_rate=rate,
                         seed=case.seed, nfe_steps=case.nfe_steps, cfg_strength=case.cfg_strength, speed=case.speed)
        assert_same_audio(got, expected[name])


def test_multi_chunk_text_has_upstreams_chunks_tokens_and_durations(theirs, tts, references, monkeypatch):
    """Upstream's chunks run in threads on one global RNG (their audio is not reproducible): what each
    chunk is given must be. Recorded from upstream's own calls of chunk_text and CFM.sample."""
    chunks, calls = [], {}
    chunk_text = theirs.infer.chunk_text
    sample = theirs.model.sample
    utils = upstream.load("model.utils")

    def recording_chunk_text(*args, **kwargs):
        result = chunk_text(*args, **kwargs)
        chunks.extend(result)
        return result

    def recording_sample(*, cond, text, duration, **kwargs):
        ids = utils.list_str_to_idx(text, theirs.model.vocab_char_map)[0]
        calls[tuple(ids[ids != -1].tolist())] = duration
        return sample(cond=cond, text=text, duration=duration, **kwargs)

    monkeypatch.setattr(theirs.infer, "chunk_text", recording_chunk_text)
    monkeypatch.setattr(theirs.model, "sample", recording_sample)
    case = Case("en", MULTI_CHUNK, nfe_steps=2)
    wave = theirs.synthesize(*references["en"], case)

    prepared = tts.preprocess(request(references, case))
    assert len(chunks) >= 3
    assert prepared.chunks == chunks
    assert {tuple(job.tokens): job.duration for job in prepared.jobs} == calls
    (ours,) = tts.synthesize([request(references, case)])
    assert ours.shape == wave.shape  # the chunk lengths and the cross-fades add up the same


FA4_NAMESPACE_CHECK = """
import importlib.util, sys
import upstream
from f5_triton.model import fa4

def load_upstream():
    for name in [n for n in sys.modules if n == "f5_tts" or n.startswith("f5_tts.")]:
        del sys.modules[name]
    dit = upstream.load("model.backbones.dit")
    assert "flash_attn_func" not in vars(sys.modules["f5_tts.model.modules"])  # upstream chose torch attention
    assert dit.DiT(dim=64, depth=1, heads=2, dim_head=32, text_num_embeds=10, mel_dim=100) is not None

try:  # the situation as FA4 leaves it: find_spec sees flash_attn, flash-attn 2's API is not there
    from flash_attn import flash_attn_func
    raise SystemExit("flash_attn_func imported: the simulated FA4 namespace is wrong")
except ImportError:
    del sys.modules["flash_attn"]  # that attempt imported the namespace: out again, as before any import
assert importlib.util.find_spec("flash_attn") is not None
load_upstream()  # upstream first: flash_attn not imported yet
assert fa4.available()  # then our code imports flash_attn.cute
load_upstream()  # upstream again, FA4 already imported
assert fa4.available() and sys.modules["flash_attn"].__spec__.origin is None  # FA4 kept for our code
print("ok")
"""


def test_upstream_loads_beside_flash_attention_4(tmp_path):
    """flash-attn-4 installs `flash_attn.cute` in a namespace package `flash_attn`; upstream's modules.py takes any
    `flash_attn` for flash-attn 2 and failed at import (`cannot import name 'flash_attn_func'`) on the GPU. A real
    namespace package on disk, in a fresh interpreter: upstream loads (tests/upstream.py hides the namespace while
    it imports) before and after our code imports FA4, which stays importable for our code."""
    upstream.package_root()  # skip (fail in CI) without upstream
    interface = tmp_path / "flash_attn" / "cute" / "interface.py"
    interface.parent.mkdir(parents=True)
    (interface.parent / "__init__.py").write_text("")
    interface.write_text("def flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError\n")
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(tmp_path), str(repo / "tests"), str(repo), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", FA4_NAMESPACE_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_bench_vs_upstream_runs_upstream_as_its_infer_process_does(parity_ckpt, tts):
    """The GPU lane's side-by-side gate (scripts/bench_vs_upstream.py) compares upstream's `CFM.sample` + Vocos with our
    fp32 output; here its upstream call runs on the CPU in fp32 against ours: a quiet reference (raised, then the
    output lowered back, as upstream's infer_batch_process does) and 16 steps (upstream's EPSS grid). Without the
    level step this row was 1.15 away (the H100 lane's first bench run, bd9fe16)."""
    import importlib.util

    from benchmarks import bench

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))  # the script's own `_checkout` import
    spec = importlib.util.spec_from_file_location("bench_vs_upstream", scripts / "bench_vs_upstream.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    wave = bench.synthetic_reference(3.0)
    assert np.sqrt(np.mean(wave**2)) < 0.1  # quiet: the level is raised and restored
    target = "Reliable servers answer every request."
    request = validate_request(wave, bench.BUILTIN_REF_TEXT, target, nfe_steps=16, seed=1)
    ours = tts.synthesize([request])[0]
    job = tts.preprocess(request).jobs[0]
    run, _, _ = script.upstream_synthesis(parity_ckpt, wave, bench.BUILTIN_REF_TEXT, target, job, 16, "cpu",
                                          torch.float32)
    assert bench.rel_l2(run(), ours) <= 1e-4
