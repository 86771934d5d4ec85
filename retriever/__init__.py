"""Retrieval database: text-image pairs indexed by text embedding with hnswlib, with the
retrieved items' latents and H-space features cached at build time
(installed as ``imageragturbo.retriever``)."""

from .build import build_index, copy_index, publish
from .index import (
    DEFAULT_EF,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    HNSWParams,
    IndexFormatError,
    Neighbours,
    RetrievalEncoder,
    RetrievalIndex,
    verify_index,
)
from .pairs import Pair, read_pairs, shapesworld_pairs

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
    "copy_index",
    "publish",
    "read_pairs",
    "shapesworld_pairs",
    "verify_index",
]
