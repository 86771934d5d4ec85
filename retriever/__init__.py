"""Retrieval database: text-image pairs indexed by text embedding with hnswlib, with the
retrieved items' latents and H-space features cached at build time
(installed as ``imageragturbo.retriever``)."""

from imageragturbo.client.lazy import lazy_exports

# Loaded on first use (PEP 562): the served retriever imports ``index`` alone, not the builder.
_EXPORTS = {
    "build": ("build_index", "copy_index", "publish"),
    "index": ("DEFAULT_EF", "DEFAULT_EF_CONSTRUCTION", "DEFAULT_M", "HNSWParams",
              "IndexFormatError", "Neighbours", "RetrievalEncoder", "RetrievalIndex",
              "verify_index"),
    "pairs": ("Pair", "read_pairs", "shapesworld_pairs"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
