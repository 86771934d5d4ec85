"""gRPC client SDK for the served ImageRAGTurbo ensemble (installed as ``imageragturbo.client``).

Depends on tritonclient[grpc], numpy and pillow only, never on torch.

>>> from imageragturbo.client import ImageRAGTurboClient
>>> with ImageRAGTurboClient("127.0.0.1:8001", timeout=30) as client:
...     result = client.generate("a small red circle", seed=0, k=3)
...     result.save("circle.png")
"""

from .errors import (
    DeadlineExceededError,
    ImageRAGTurboError,
    InvalidInputError,
    OverloadedError,
    QueueTimeoutError,
    RecoveringError,
    ServerError,
    UnavailableError,
)
from .sdk import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    NO_RETRY,
    AsyncImageRAGTurboClient,
    GenerationResult,
    ImageRAGTurboClient,
    Neighbour,
    RetryPolicy,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "NO_RETRY",
    "AsyncImageRAGTurboClient",
    "DeadlineExceededError",
    "GenerationResult",
    "ImageRAGTurboClient",
    "ImageRAGTurboError",
    "InvalidInputError",
    "Neighbour",
    "OverloadedError",
    "QueueTimeoutError",
    "RecoveringError",
    "RetryPolicy",
    "ServerError",
    "UnavailableError",
]
