"""The model core: the split UNet (``unet_split``), H-space injection and the H-adapter
(``h_space``), the five named stages and the one one-step forward (``stages``), decoder LoRA (``lora``), component loading (``family``), PyTorch pipelines
(``pipeline``), the CLIP-score analogue (``clip_scorer``), and the diffusers mixins our own
modules save and load through (``pretrained``).

Submodules import torch; this package's ``__init__`` does not, so torch-free code can import
``imageragturbo.model`` names lazily. The five stages of the one-step model are named in
``stages``.
"""

from imageragturbo.defaults import DEFAULT_MODEL


def load_retrieval_encoder(model: str = DEFAULT_MODEL, device: str = "cpu"):
    """The pipeline's text encoder, VAE and UNet encoder as a ``RetrievalEncoder`` for
    ``imageragturbo.retriever`` (imports torch)."""
    from .encoder import TorchRetrievalEncoder

    return TorchRetrievalEncoder.load(model, device)
