"""Typed errors of the SDK: one base class, one subclass per gRPC status a caller handles
differently."""

from __future__ import annotations


class ImageRAGTurboError(Exception):
    """Any failure of a request to the served ensemble. ``status`` is the gRPC status name
    (``INVALID_ARGUMENT``, ``UNAVAILABLE``, ...) when the server or the channel gave one."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidInputError(ImageRAGTurboError, ValueError):
    """The server rejected the request (INVALID_ARGUMENT): an empty or non-UTF-8 prompt, a
    wrong dtype, a missing input, a batch larger than the server's maximum, a bad K or
    STRENGTH. Not retried: the same request would fail again."""


class UnavailableError(ImageRAGTurboError):
    """The server cannot be reached or is not ready, or its queue is full (UNAVAILABLE).
    Retried with capped exponential backoff before this is raised."""


class OverloadedError(UnavailableError):
    """The server's queue is full ("Exceeds maximum queue size"): rejected at once, not after
    a timeout. Retried with backoff like any UNAVAILABLE, then raised: shed load or retry
    later."""


class QueueTimeoutError(UnavailableError):
    """The request waited in the server's queue longer than its queue timeout ("Request
    timeout expired"): the server is behind. Retried with backoff, then raised."""


class RecoveringError(UnavailableError):
    """A model of the ensemble is down and being brought back: its Python-backend process died
    (INTERNAL "Stub process ... is not healthy") or the server's supervisor has unloaded it to
    reload it (NOT_FOUND "... has no available versions" / "is not ready"). Transient, like
    UNAVAILABLE: retried with backoff, then raised. ``status`` keeps the server's own code."""


class DeadlineExceededError(ImageRAGTurboError, TimeoutError):
    """The request did not complete within its timeout (DEADLINE_EXCEEDED)."""


class ServerError(ImageRAGTurboError):
    """Any other server-side failure (INTERNAL, NOT_FOUND for a missing model, ...)."""


def from_triton(exc) -> ImageRAGTurboError:
    """Map a ``tritonclient.utils.InferenceServerException`` to the SDK's errors."""
    status = str(exc.status() or "")
    name = status.rsplit(".", 1)[-1] if status else None
    msg = exc.message() or str(exc)
    cls = {"INVALID_ARGUMENT": InvalidInputError, "UNAVAILABLE": UnavailableError,
           "DEADLINE_EXCEEDED": DeadlineExceededError}.get(name or "", ServerError)
    if cls is ServerError and "Deadline Exceeded" in msg:
        cls, name = DeadlineExceededError, "DEADLINE_EXCEEDED"
    if cls is ServerError and _recovering(name, msg):
        cls = RecoveringError
    elif cls is UnavailableError and "maximum queue size" in msg:
        cls = OverloadedError
    elif cls is UnavailableError and "timeout expired" in msg.lower():
        cls = QueueTimeoutError
    return cls(msg, name)


def _recovering(status: str | None, msg: str) -> bool:
    """The server's words for a model that is down but coming back (tritonserver 2.51): a
    dead stub, or an ensemble (or a model) unloaded for a reload. A model name that was never
    served ("... is not found") stays a ServerError."""
    if status == "INTERNAL":
        return "Stub process" in msg and "is not healthy" in msg
    if status in ("NOT_FOUND", "UNAVAILABLE"):
        return "has no available versions" in msg or "is not ready" in msg
    return False
