"""gRPC client SDK for the served ImageRAGTurbo ensemble.

Installed twice over, from these same files: as ``imageragturbo.client`` by the main
distribution ``imageragturbo``, and as ``imageragturbo_client`` by the slim distribution
``imageragturbo-client`` (this folder's pyproject.toml; docs/environment.md says why the two
names). Depends on tritonclient[grpc], numpy and pillow only, never on torch; its modules import
one another relatively, so the code is the same under either name.

>>> from imageragturbo.client import ImageRAGTurboClient   # or: from imageragturbo_client import ...
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
