"""f5-triton: serve F5-TTS voice cloning with NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
