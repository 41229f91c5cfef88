"""The one error type for bad user input; Triton adapters map it to INVALID_ARGUMENT / HTTP 400."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """A request (or a file a user pointed us at) is not acceptable.

    `field` names the input ("target_text", "reference_wav", "--ckpt", ...) and the message says
    the limit that was broken, so that a client can fix its request without reading our code.
    """

    def __init__(self, field: str, message: str, reason: str = "invalid"):
        self.field = field
        self.reason = reason  # short machine-readable label, used for metrics ("too_long", "empty", ...)
        super().__init__(f"{field}: {message}")


class CheckpointError(RuntimeError):
    """A checkpoint, vocab or vocoder folder could not be loaded as published."""


class ServerBusyError(RuntimeError):
    """No room for the request now (an admission limit is reached); the same request may succeed later.

    Adapters map it to UNAVAILABLE (HTTP 503), the status clients retry on.
    """

    def __init__(self, message: str, reason: str = "busy"):
        super().__init__(message)
        self.reason = reason  # metrics label: "busy" (a limit of streams or requests), "queue_timeout"
