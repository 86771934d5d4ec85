"""Retrieval database: text-image pairs indexed by text embedding with hnswlib, with the
retrieved items' latents and H-space features cached at build time
(installed as ``imageragturbo.retriever``)."""
