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
from .pipeline import tokenize
from .stages import TextEncoder, UNetEncoder, images_to_unit


def resolve_device(device: str = "cpu") -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    device that is not available is a ValueError (one line at the CLI)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA "
                         "devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: cpu, cuda or auto")
    return dev


class TorchRetrievalEncoder:
    """The encoders on ``device`` (the text encoder, the VAE and the UNet encoder; arrays in
    and out are on the host)."""

    def __init__(self, components: Components, model_id: str, device: str = "cpu"):
        self.c = components
        self.model_id = model_id
        self.text_dim = int(components.text_encoder.config.hidden_size)
        self.device = resolve_device(device)
        if self.device.type != "cpu":
            for m in (components.text_encoder, components.vae, components.unet):
                m.to(self.device)
        self._enc = UNetEncoder(components.unet)

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, device: str = "cpu"
             ) -> TorchRetrievalEncoder:
        path = resolve(model)
        dev = resolve_device(device)     # before loading anything: a clear error first
        return cls(load_components(path), files_identity(path, INDEX_PARTS), str(dev))

    def _prompt(self, captions: list[str]):
        """``pipeline.encode_prompt`` on the encoder's device."""
        ids = tokenize(self.c.tokenizer, list(captions)).to(self.device)
        return TextEncoder(self.c.text_encoder)(ids)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> np.ndarray:
        return self._prompt(captions)[1].float().cpu().numpy()                     # (B, D)

    @torch.no_grad()
    def encode_images(self, images: list) -> np.ndarray:
        from imageragturbo.images import fit_square

        # the shorter side resized and the centre cropped, as training reads its images
        size = self.c.vae.config.sample_size
        arr = np.stack([np.asarray(fit_square(im.convert("RGB"), size)) for im in images])
        x = images_to_unit(arr)                                                     # (B, 3, H, W)
        z = self.c.vae.encode(x.to(self.device, self.c.vae.dtype)).latent_dist.mode()
        return (z * self.c.vae.config.scaling_factor).float().cpu().numpy()        # (B, C, h, w)

    @torch.no_grad()
    def h_features(self, latents: np.ndarray, captions: list[str]) -> np.ndarray:
        ehs = self._prompt(captions)[0]
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(self.device, ehs.dtype)
        t = torch.zeros(len(z), dtype=torch.long, device=self.device)               # t = 0
        return self._enc(z, t, ehs)[0].float().cpu().numpy()                        # (B, C2, h2, w2)
