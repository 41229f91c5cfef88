#!/usr/bin/env python3
"""Speak a text in the voice of a reference clip, through Triton over gRPC.

    python client_grpc.py --reference-audio ref.wav --reference-text "..." --target-text "..." -h
    python client_grpc.py --streaming ...   # f5_tts_streaming: pieces as they come, time to first audio
"""

import sys

from f5_triton.client import run_client

if __name__ == "__main__":
    sys.exit(run_client("grpc"))
