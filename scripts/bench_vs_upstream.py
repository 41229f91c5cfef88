#!/usr/bin/env python3
"""Side by side, in one run: upstream F5-TTS's PyTorch inference vs f5-triton's, same weights and lengths.

    python scripts/bench_vs_upstream.py --arch F5TTS_v1_Base --nfe 16 --dtype fp16 --ref-seconds 5 --gen-seconds 10

Upstream = pinned f5-tts==1.1.22: `CFM.sample` (its DiT, torchdiffeq Euler, CFG) + `Vocos.decode`, fp16,
batch 1 (as its infer_process runs). Ours = `f5_triton.pipeline.TTS` with the chosen engine options.
Both start from the same random weights (F5TTS_v1_Base size) and the same reference and durations.
Prints a table (median of --repeats timed runs after warm-up), the speed-up, the audio's distance to
our fp32 output, DiT-step MFU against the measured bf16 matmul peak, and writes JSON. Exits 1 when a row's audio is
further than --max-rel-l2 from our fp32 output (the GPU lane's gate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/upstream.py: upstream loader

import _checkout  # noqa: E402,F401  (benchmarks/ beside the package)
from benchmarks import bench  # noqa: E402
from f5_triton.config import ARCHITECTURES, DEFAULT_SAMPLING, HOP_LENGTH, SAMPLE_RATE, TARGET_RMS  # noqa: E402
from f5_triton.engines import torch_dtype  # noqa: E402


def timed(fn, repeats: int, warmup: int = 2) -> tuple[float, object]:
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print("  runs (s): " + " ".join(f"{t:.4f}" for t in times))
    return statistics.median(times), out



def upstream_synthesis(folder: Path, wave: np.ndarray, ref_text: str, target: str, job, steps: int, device: str,
                       dtype: torch.dtype):
    """Upstream's `CFM.sample` + `Vocos.decode` on the checkpoint in `folder`, for `job`'s durations (seed 1), with
    the reference and output levels as upstream's infer_process treats them. Returns (a call that makes the audio,
    the model, the vocoder)."""
    import upstream
    from vocos import Vocos

    from f5_triton.audio import clip_reference, normalize_rms
    from f5_triton.checkpoints import read_raw_state_dict, resolve_architecture, transformer_state_dict
    from f5_triton.text import Tokenizer, fix_reference_text

    dit_mod, cfm_mod = upstream.load("model.backbones.dit"), upstream.load("model.cfm")
    tokenizer = Tokenizer(folder / "vocab.txt")
    config = resolve_architecture(folder / "model.safetensors")
    kwargs = {k: getattr(config, k) for k in config.__dataclass_fields__}
    kwargs["text_num_embeds"] = tokenizer.vocab_size
    model = cfm_mod.CFM(transformer=dit_mod.DiT(**kwargs)).to(device)
    model.transformer.load_state_dict(transformer_state_dict(read_raw_state_dict(folder / "model.safetensors")))
    model = model.to(dtype).eval()
    vocos = Vocos.from_hparams(str(folder / "vocos" / "config.yaml"))
    vocos.load_state_dict(torch.load(folder / "vocos" / "pytorch_model.bin", map_location="cpu"))
    vocos = vocos.to(device).eval()
    tokens = torch.tensor([tokenizer.encode(fix_reference_text(ref_text) + target)], device=device)
    # the reference as upstream's preprocess_ref_audio_text + infer_batch_process leave it
    cond, ref_rms = normalize_rms(torch.from_numpy(clip_reference(wave, SAMPLE_RATE))[None])
    cond = cond.to(device)
    # upstream's infer_batch_process lowers the output back when it raised a quiet reference (written out here, as
    # upstream does, so that this row does not lean on our restore_rms)
    level = float(ref_rms) / TARGET_RMS if float(ref_rms) < TARGET_RMS else 1.0

    def run() -> np.ndarray:
        with torch.inference_mode():
            mel, _ = model.sample(cond=cond, text=tokens, duration=job.duration, steps=steps,
                                  cfg_strength=DEFAULT_SAMPLING.cfg_strength,
                                  sway_sampling_coef=DEFAULT_SAMPLING.sway_sampling_coef, seed=1)
            mel = mel.float()[:, job.ref_frames:].permute(0, 2, 1)
            return vocos.decode(mel)[0].cpu().numpy() * level

    return run, model, vocos

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="F5TTS_v1_Base", choices=sorted(ARCHITECTURES))
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--ref-seconds", type=float, default=5.0)
    p.add_argument("--gen-seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="eager,graphs,compile+graphs",
                   help="our engine variants: eager, graphs, compile, compile+graphs; 'stepgraphs' = CUDA graphs "
                        "per DiT call instead of 8 ODE steps per graph")
    p.add_argument("--mfu-batch", type=int, default=8, help="requests per DiT step for the MFU measurement")
    p.add_argument("--skip-upstream", action="store_true")
    p.add_argument("--max-rel-l2", type=float, default=bench.FP16_WAVE_REL_L2,
                   help="fail (exit 1) when any row's audio is further than this relative L2 from our fp32 output "
                        "(default: benchmarks.bench.FP16_WAVE_REL_L2, justified there)")
    p.add_argument("--output-json")
    p.add_argument("--plot", help="PNG bar chart of the side-by-side times")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch_dtype(args.dtype)

    from f5_triton.checkpoints import make_random_checkpoint
    from f5_triton.engines import EngineConfig, make_dit_runner
    from f5_triton.pipeline import TTS
    from f5_triton.request import validate_request

    folder = make_random_checkpoint(tempfile.mkdtemp(prefix="f5-side-"), args.arch, vocoder_small=False)
    wave = bench.synthetic_reference(args.ref_seconds)
    ref_text = bench.BUILTIN_REF_TEXT
    ref_frames = len(wave) // HOP_LENGTH
    gen_frames = int(args.gen_seconds * SAMPLE_RATE / HOP_LENGTH)
    # target text sized so that upstream's duration formula asks for gen_frames
    gen_bytes = int(round(gen_frames * len((ref_text + "  ").encode()) / ref_frames))
    target = (" ".join(bench.BUILTIN_TARGETS) * 3).encode()[:gen_bytes].decode("utf-8", "ignore")
    request = validate_request(wave, ref_text, target, nfe_steps=args.nfe, seed=1)
    rows, results = [], {"arch": args.arch, "nfe": args.nfe, "dtype": args.dtype, "gpu": torch.cuda.get_device_name()}

    def run_ours(tts):
        return tts.synthesize([request])[0]

    # our fp32 eager output is the reference for the audio tolerance
    ref_tts = TTS.from_paths(folder / "model.safetensors", folder / "vocab.txt", folder / "vocos", device="cuda",
                             dtype=torch.float32)
    reference_audio = run_ours(ref_tts)
    audio_seconds = len(reference_audio) / SAMPLE_RATE
    job = ref_tts.preprocess(request).jobs[0]
    del ref_tts
    torch.cuda.empty_cache()
    results.update(audio_seconds=audio_seconds, total_frames=job.duration, ref_frames=job.ref_frames)

    def rel_err(audio):
        return bench.rel_l2(audio, reference_audio)

    if not args.skip_upstream:
        run_upstream, model, vocos = upstream_synthesis(folder, wave, ref_text, target, job, args.nfe, "cuda", dtype)
        seconds, audio = timed(run_upstream, args.repeats)
        rows.append(("upstream CFM.sample + Vocos", seconds, seconds / audio_seconds, rel_err(audio)))
        results["upstream_seconds"] = seconds
        del run_upstream, model, vocos
        torch.cuda.empty_cache()

    best = None  # (variant, seconds, tts) of the fastest
    for variant in args.variants.split(","):
        engine = EngineConfig(kind="torch", device="cuda", compile="compile" in variant,
                              cuda_graphs="graphs" in variant, graph_steps=0 if "stepgraphs" in variant else 8)
        torch.cuda.reset_peak_memory_stats()
        tts = TTS.from_paths(folder / "model.safetensors", folder / "vocab.txt", folder / "vocos", device="cuda",
                             dtype=dtype, engine=lambda dit: make_dit_runner(dit, engine))
        seconds, audio = timed(lambda: run_ours(tts), args.repeats)
        rows.append((f"f5-triton {variant}", seconds, seconds / audio_seconds, rel_err(audio)))
        from torch._dynamo.utils import counters

        print(f"{variant}: dynamo {dict(counters['stats'])}, recompiles {dict(counters['recompiles'])}")
        results[f"ours_{variant}_seconds"] = seconds
        results[f"ours_{variant}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if best is None or seconds < best[1]:
            best = (variant, seconds, tts)

    # DiT-step MFU at a serving batch, with the fastest variant's engine
    peak = bench.matmul_peak_tflops()
    results["matmul_peak_tflops"] = peak
    variant, fastest, tts = best
    runner = tts.flow_matching.model
    config = runner.model.config if hasattr(runner, "model") else runner.config
    b, n = 2 * args.mfu_batch, job.duration  # CFG doubles the batch
    x = torch.randn(b, n, config.mel_dim, device="cuda", dtype=dtype)
    text_embed = torch.randn(b, n, config.text_dim, device="cuda", dtype=dtype)
    time_ = torch.rand(b, device="cuda", dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
    step_seconds, _ = timed(lambda: runner.step(x, x, text_embed, time_, mask), repeats=20)
    achieved = bench.dit_step_flops(config, b * n, n) / step_seconds / 1e12
    results.update({"mfu_variant": variant, "dit_step_seconds": step_seconds, "dit_step_tflops": achieved,
                    "mfu": achieved / peak, "mfu_batch": args.mfu_batch})
    print(f"DiT step ({variant}), {args.mfu_batch} requests (batch {b}) x {n} frames: {step_seconds * 1e3:.2f} ms, "
          f"{achieved:.0f} TFLOP/s = {100 * achieved / peak:.1f}% of measured bf16 matmul peak {peak:.0f} TFLOP/s")

    print(f"\nGPU {results['gpu']}, {args.arch}, NFE {args.nfe}, {args.dtype}, batch 1, "
          f"{args.ref_seconds:.1f} s reference + {audio_seconds:.2f} s generated ({job.duration} frames)")
    print(f"{'pipeline':34s} {'seconds':>9s} {'RTF':>8s} {'audio rel. L2 vs ours fp32':>28s}")
    for name, seconds, rtf, err in rows:
        print(f"{name:34s} {seconds:9.4f} {rtf:8.4f} {err:28.4f}")
    if "upstream_seconds" in results:
        results["speedup_vs_upstream"] = results["upstream_seconds"] / fastest
        print(f"speed-up of f5-triton ({variant}) over upstream: {results['upstream_seconds'] / fastest:.2f}x")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    if args.plot:
        print(f"plot: {bench.plot_side_by_side(results, args.plot)}")
    too_far = [f"{name}: {err:.4f}" for name, _, _, err in rows if not err <= args.max_rel_l2]  # NaN fails too
    if too_far:
        sys.exit(f"audio further than --max-rel-l2 {args.max_rel_l2} from our fp32 output: {'; '.join(too_far)}")
    print(f"every row's audio within rel. L2 {args.max_rel_l2} of our fp32 output")


if __name__ == "__main__":
    main()
