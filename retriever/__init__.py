"""Retrieval database: text-image pairs indexed by text embedding with hnswlib, with the
retrieved items' latents and H-space features cached at build time
(installed as ``imageragturbo.retriever``)."""

import importlib

# Loaded on first use (PEP 562): the served retriever imports ``index`` alone, not the builder.
_EXPORTS = {
    "build": ("build_index", "copy_index", "publish"),
    "index": ("DEFAULT_EF", "DEFAULT_EF_CONSTRUCTION", "DEFAULT_M", "HNSWParams",
              "IndexFormatError", "Neighbours", "RetrievalEncoder", "RetrievalIndex",
              "verify_index"),
    "pairs": ("Pair", "read_pairs", "shapesworld_pairs"),
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
