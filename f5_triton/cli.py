"""`f5-triton` command line: synth (in process), serve (Triton), and helpers."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from f5_triton.errors import CheckpointError, InvalidInputError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt-dir", help="folder with model.* + vocab.txt + vocos/ (as make_random_checkpoint writes)")
    group.add_argument("--ckpt", help="checkpoint file (model_*.safetensors or .pt)")
    group.add_argument("--vocab", help="vocab.txt of the checkpoint")
    group.add_argument("--vocoder", help="Vocos folder (config.yaml + pytorch_model.bin)")
    group.add_argument("--arch", help="architecture name when no model.yaml is beside the checkpoint")


def resolve_model_paths(args) -> tuple[Path, Path, Path]:
    """--ckpt/--vocab/--vocoder, each defaulting to its place inside --ckpt-dir."""
    from f5_triton.checkpoints import find_checkpoint

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir is None and not (args.ckpt and args.vocab and args.vocoder):
        raise InvalidInputError("--ckpt-dir", "give --ckpt-dir, or all of --ckpt, --vocab and --vocoder")
    if ckpt_dir is not None and not ckpt_dir.is_dir():
        raise InvalidInputError("--ckpt-dir", f"{ckpt_dir} is not a folder")
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(ckpt_dir)
    vocab = Path(args.vocab) if args.vocab else ckpt.parent / "vocab.txt"
    if args.vocoder:
        vocoder = Path(args.vocoder)
    else:
        candidates = [ckpt_dir / "vocos", ckpt_dir.parent / "vocos-mel-24khz", ckpt_dir / "vocos-mel-24khz"]
        vocoder = next((c for c in candidates if c.is_dir()), candidates[0])
    return ckpt, vocab, vocoder


def cmd_synth(args) -> int:
    import soundfile as sf
    import torch

    from f5_triton.audio import read_audio
    from f5_triton.checkpoints import is_random_checkpoint
    from f5_triton.config import SAMPLE_RATE
    from f5_triton.pipeline import TTS
    from f5_triton.request import validate_request

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device", "cuda was asked for but no CUDA GPU is visible")
    if args.dtype != "fp32" and args.device == "cpu":
        raise InvalidInputError("--dtype", f"{args.dtype} needs --device cuda; use fp32 on the CPU")
    ckpt, vocab, vocoder = resolve_model_paths(args)
    wave, rate = read_audio(args.ref_audio)
    request = validate_request(wave, args.ref_text, args.text, sample_rate=rate, nfe_steps=args.nfe,
                               cfg_strength=args.cfg, speed=args.speed, seed=args.seed)
    tts = TTS.from_paths(ckpt, vocab, vocoder, arch=args.arch, device=args.device,
                         dtype=getattr(torch, DTYPES[args.dtype]))
    start = time.perf_counter()
    out = tts.synthesize([request])[0]
    latency = time.perf_counter() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.output, out, SAMPLE_RATE)
    seconds = len(out) / SAMPLE_RATE
    print(f"wrote {args.output}: {seconds:.2f} s of audio at {SAMPLE_RATE} Hz in {latency:.2f} s "
          f"(RTF {latency / seconds:.3f}, model loading not counted)")
    if is_random_checkpoint(ckpt):
        print(f"WARNING: {ckpt} holds RANDOM WEIGHTS: the audio is noise, not speech", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from f5_triton.config import DEFAULT_SAMPLING

    parser = argparse.ArgumentParser(prog="f5-triton", description="Serve F5-TTS with Triton Inference Server")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="speak a text in the voice of a reference clip, in process",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(synth)
    synth.add_argument("--ref-audio", required=True, help="reference clip (wav, flac, ogg or mp3; 3-15 s is best)")
    synth.add_argument("--ref-text", required=True, help="transcript of the reference clip")
    synth.add_argument("--text", required=True, help="text to speak")
    synth.add_argument("-o", "--output", default="out.wav", help="wav file to write")
    synth.add_argument("--nfe", type=int, default=DEFAULT_SAMPLING.nfe_steps, help="ODE steps (16 or 7: faster)")
    synth.add_argument("--cfg", type=float, default=DEFAULT_SAMPLING.cfg_strength, help="guidance strength")
    synth.add_argument("--speed", type=float, default=DEFAULT_SAMPLING.speed, help="speaking rate")
    synth.add_argument("--seed", type=int, default=None, help="noise seed (None: random)")
    synth.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    synth.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    synth.set_defaults(func=cmd_synth)

    from f5_triton.serving import commands

    commands.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidInputError, CheckpointError) as exc:
        print(f"f5-triton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
