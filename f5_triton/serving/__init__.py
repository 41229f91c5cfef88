"""Serving side of f5-triton: starting tritonserver and the Triton model repository."""
