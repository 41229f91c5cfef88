#!/usr/bin/env python3
"""Speak a text in the voice of a reference clip, through Triton over HTTP.

    python client_http.py --reference-audio ref.wav --reference-text "..." --target-text "..." -h
"""

import sys

from f5_triton.client import run_client

if __name__ == "__main__":
    sys.exit(run_client("http"))
