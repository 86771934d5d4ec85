"""ImageRAGTurbo: one-step, retrieval-augmented text-to-image generation, served with Triton.

Sub-packages (one distribution, one namespace):
``imageragturbo.shapesworld`` (the generated benchmark world), ``imageragturbo.tifa`` (the
ShapesTIFA scorer), ``imageragturbo.client``, ``imageragturbo.retriever``,
``imageragturbo.training``, ``imageragturbo.export``.
"""

__version__ = "0.1.0"
