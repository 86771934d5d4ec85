"""Retrieval database: text-image pairs indexed by text embedding with hnswlib, with the
retrieved items' latents and H-space features cached at build time
(installed as ``imageragturbo.retriever``)."""

from .index import (
    DEFAULT_EF,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    HNSWParams,
    IndexFormatError,
    Neighbours,
    Pair,
    RetrievalEncoder,
    RetrievalIndex,
    build_index,
    read_pairs,
    shapesworld_pairs,
)

__all__ = [
    "DEFAULT_EF",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_M",
    "HNSWParams",
    "IndexFormatError",
    "Neighbours",
    "Pair",
    "RetrievalEncoder",
    "RetrievalIndex",
    "build_index",
    "read_pairs",
    "shapesworld_pairs",
]
