"""What the supervisor raises."""

from __future__ import annotations


class TritonNotFoundError(RuntimeError):
    """No usable ``tritonserver`` installation was found."""


class TritonServerError(RuntimeError):
    """The server could not be started, did not become ready, or died."""

