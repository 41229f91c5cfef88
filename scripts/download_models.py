#!/usr/bin/env python3
"""Download the official F5-TTS checkpoint, its vocab and the Vocos vocoder into ckpts/.

    python scripts/download_models.py --model F5TTS_v1_Base --output ckpts

Layout written (what scripts/build_model_repo.py --ckpt-dir expects):
    ckpts/F5TTS_v1_Base/model_1250000.safetensors, ckpts/F5TTS_v1_Base/vocab.txt, ckpts/vocos-mel-24khz/
"""

import argparse
import sys

from f5_triton.checkpoints import download_official
from f5_triton.config import ARCHITECTURES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="F5TTS_v1_Base", choices=[n for n in ARCHITECTURES if n != "tiny"])
    parser.add_argument("--output", default="ckpts")
    args = parser.parse_args()
    try:
        paths = download_official(args.model, args.output)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
