#!/usr/bin/env python3
"""Write a random-weight F5-TTS checkpoint + vocab + Vocos folder in the official layout.

    python scripts/make_random_checkpoint.py --config tiny --output ckpts/tiny

The files load with the same code as the published weights (vocos/config.yaml is charactr/vocos-mel-24khz's,
only smaller for tiny); the audio they make is noise, not speech.
"""

import argparse

from f5_triton.checkpoints import make_random_checkpoint
from f5_triton.config import ARCHITECTURES
from f5_triton.engines import torch_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(ARCHITECTURES))
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--vocab", help="vocab.txt to use (e.g. the official one); default: a small 256-token vocab")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "pt"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-vocoder", action="store_true", help="full-size random Vocos even for tiny")
    args = parser.parse_args()
    dtype = torch_dtype(args.dtype)
    out = make_random_checkpoint(args.output, args.config, args.vocab, seed=args.seed, fmt=args.format,
                                 dtype=dtype, vocoder_small=False if args.full_vocoder else None)
    print(f"wrote random {args.config} checkpoint to {out} (model.{args.format}, model.yaml, vocab.txt, vocos/)")


if __name__ == "__main__":
    main()
