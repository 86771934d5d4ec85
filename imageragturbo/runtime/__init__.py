"""The request path: everything a served (or in-process) request runs, with numpy,
onnxruntime, the CLIP tokenizer and the retriever only (never torch).

- ``manifest``: an export folder's manifest, read and checked (sizes, optionally sha256).
- ``request``: the NumPy steps around the ONNX stages: initial noise, retrieval controls,
  slerp injection, uint8 conversion, index loading and lookup.
- ``pipeline``: ``OnnxPipeline``, the five exported stages chained in process, and the choice
  of execution providers.
- ``cli``: ``imageragturbo generate``.

The Triton backends in ``imageragturbo.model_repository`` import ``request``; ``serving`` and
``bench serve`` import ``manifest`` and ``pipeline``. ``imageragturbo.export`` writes what
``manifest`` reads, and nothing here imports it.
"""

import importlib

# Loaded on first use (PEP 562): a Triton backend that imports ``runtime.request`` runs this
# file, and must not load the pipeline (onnxruntime, the tokenizer) or the device chain with it.
_EXPORTS = {
    "manifest": ("MANIFEST", "load_manifest", "stage_names"),
    "pipeline": ("OnnxPipeline", "choose_providers", "describe"),
    "request": ("initial_noise", "load_index", "retrieval_controls", "retrieve",
                "slerp_inject", "to_uint8"),
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
