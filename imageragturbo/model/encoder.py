"""The pipeline's own encoders as the retriever's ``RetrievalEncoder``: the text encoder's
pooled (EOS) embedding, L2-normalised, is the retrieval key (paper Sec. 4.1: "we reuse the same
CLIP text features used by the stable diffusion model"); the VAE gives the retrieved items'
latents z_0^retr; the student UNet's encoder at t=0 gives their H-space features
h^retr = f_enc(tau(p^retr), 0, z_0^retr) (paper Sec. 3.2), cached at build time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imageragturbo.defaults import DEFAULT_MODEL, INDEX_PARTS, files_identity

from .family import Components, load_components, resolve
from .pipeline import encode_prompt
from .stages import UNetEncoder, images_to_unit


class TorchRetrievalEncoder:
    def __init__(self, components: Components, model_id: str):
        self.c = components
        self.model_id = model_id
        self.text_dim = int(components.text_encoder.config.hidden_size)
        self._enc = UNetEncoder(components.unet)

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL) -> TorchRetrievalEncoder:
        path = resolve(model)
        return cls(load_components(path), files_identity(path, INDEX_PARTS))

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> np.ndarray:
        return encode_prompt(self.c, list(captions))[1].numpy().astype(np.float32)   # (B, D)

    @torch.no_grad()
    def encode_images(self, images: list) -> np.ndarray:
        from imageragturbo.images import fit_square

        # the shorter side resized and the centre cropped, as training reads its images
        size = self.c.vae.config.sample_size
        arr = np.stack([np.asarray(fit_square(im.convert("RGB"), size)) for im in images])
        x = images_to_unit(arr)                                                     # (B, 3, H, W)
        z = self.c.vae.encode(x.to(self.c.vae.dtype)).latent_dist.mode()
        return (z * self.c.vae.config.scaling_factor).float().numpy()              # (B, C, h, w)

    @torch.no_grad()
    def h_features(self, latents: np.ndarray, captions: list[str]) -> np.ndarray:
        ehs, _ = encode_prompt(self.c, list(captions))
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(ehs.dtype)
        t = torch.zeros(len(z), dtype=torch.long)                                   # t = 0
        return self._enc(z, t, ehs)[0].float().numpy()                              # (B, C2, h2, w2)
