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

import importlib

# Loaded on first use (PEP 562), so that ``contract`` (standard library only) imports without
# numpy or tritonclient: export and training code import it and install without them.
_EXPORTS = {
    "errors": ("DeadlineExceededError", "ImageRAGTurboError", "InvalidInputError",
               "OverloadedError", "QueueTimeoutError", "RecoveringError", "ServerError",
               "UnavailableError"),
    "sdk": ("DEFAULT_URL", "NO_RETRY", "AsyncImageRAGTurboClient", "GenerationResult",
            "ImageRAGTurboClient", "Neighbour", "RetryPolicy"),
    "contract": ("ENSEMBLE_NAME",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
