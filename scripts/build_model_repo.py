#!/usr/bin/env python3
"""Render a ready Triton model repository for a target (cpu, gpu or trt).

    python scripts/build_model_repo.py --target cpu --ckpt-dir ckpts/tiny --output model_repo_cpu
    python scripts/build_model_repo.py --target trt --ckpt-dir ckpts/F5TTS_v1_Base \
        --dit-engine-path engines/dit_step.plan --vocoder-plan engines/vocoder.plan --output repo
"""

import argparse
import sys

from f5_triton.errors import CheckpointError, InvalidInputError
from f5_triton.model_paths import add_model_args, resolve_model_paths
from f5_triton.repository import add_repository_arguments, options_from_args, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="repository folder to write (replaced)")
    add_model_args(parser)
    add_repository_arguments(parser)
    args = parser.parse_args()
    try:
        ckpt, vocab, vocoder = resolve_model_paths(args)
        options = options_from_args(args, ckpt, vocab, vocoder)
        out = render(options, args.output)
    except (ValueError, InvalidInputError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
    print(f"rendered {args.target} model repository at {out}")


if __name__ == "__main__":
    main()
