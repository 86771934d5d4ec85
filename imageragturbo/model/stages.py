"""The five stages of ImageRAGTurbo's one-step model (paper Fig. 2), one torch module each, used
by the PyTorch pipeline, the training loops and the ONNX export alike:

==============  =============================================  =================================
stage           in                                             out
==============  =============================================  =================================
``TextEncoder``  token ids (B, L)                                text states tau(p) (B, L, D) and
                                                               the L2-normalised pooled (EOS)
                                                               embedding (B, D): the retrieval
                                                               key (paper Sec. 4.1)
``UNetEncoder``  z_t, t, text states                            h (the mid-block feature, paper
                                                               Sec. 3.1), temb, skips
``HAdapter``     h, retrieved h (B, k, C, h', w'), lambda (B,)  h + lambda g(h, h_retr) (Eq. 5)
``UNetDecoder``  h, temb, skips, text states, z_t, t            z_0 (the up blocks, then Eq. 1
                                                               solved for z_0)
``VAEDecoder``   z_0 as the UNet sees it                        image (B, 3, H, W) in ~[-1, 1]
==============  =============================================  =================================

``UNetEncoder``, ``UNetDecoder`` and ``one_step_z0`` live in ``unet_split`` (the split itself),
``HAdapter`` in ``h_space``; this module adds the two ends and ``OneStepStudent``, the one
one-step forward (UNet encoder, optional edit of h, UNet decoder with the update) that every
consumer calls.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imageragturbo.defaults import STUDENT_TIMESTEP, to_unit

from .h_space import HAdapter
from .unet_split import UNetDecoder, UNetEncoder, one_step_z0

__all__ = ["TextEncoder", "UNetEncoder", "HAdapter", "UNetDecoder", "VAEDecoder",
           "OneStepStudent", "one_step_z0", "images_to_unit"]


class TextEncoder(nn.Module):
    """tau: token ids (B, L) -> (text states (B, L, D), pooled (B, D)); L is the tokenizer's
    context length (tiny-shapes 24, SD 77); pooled is the EOS
    token's final state, L2-normalised in fp32: the retrieval key (paper Sec. 4.1: the SD
    model's own CLIP text features index the database)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids)
        pooled = nn.functional.normalize(out.pooler_output.float(), dim=-1)  # (B, D)
        return out.last_hidden_state, pooled


def images_to_unit(images) -> torch.Tensor:
    """uint8 images (B, H, W, 3), numpy -> float (B, 3, H, W) in [-1, 1]: what the VAE encoder
    and the scorer's image tower take (the inverse of ``VAEDecoder`` + ``from_unit``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return to_unit(x)


class VAEDecoder(nn.Module):
    """D: latents (B, 4, h, w) as the UNet sees them -> image (B, 3, H, W) in about [-1, 1]
    (1 / scaling_factor applied here; clamping and rounding to pixels are the caller's)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents * self.inv_scale).sample


class OneStepStudent(nn.Module):
    """z_T and text states -> z_0 in one step at t = 999 (SD-Turbo's step) through the split
    UNet: UNet encoder, then ``h_edit(h)`` when given (the H-adapter with the retrieved
    features, or slerp injection), then the UNet decoder with the one-step update. The one
    forward of the PyTorch pipeline and of both training recipes; a multi-GPU run wraps this
    module (not the bare UNet) in DDP, so gradients are synchronised over the split forward."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon"):
        super().__init__()
        self.unet = unet
        self.unet_encoder = UNetEncoder(unet)
        self.unet_decoder = UNetDecoder(unet, alphas_cumprod, prediction_type)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.unet_decoder.alphas_cumprod

    def forward(self, z_t: torch.Tensor, ehs: torch.Tensor, h_edit=None,
                decoder_ehs: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        """``decoder_ehs``: what the decoder's cross-attention takes in place of ``ehs`` (the
        text states with the neighbours' tokens appended: ``NeighbourAttention``). ``t`` (B,)
        long: each input's timestep, t = 999 (SD-Turbo's one step) when None; a smaller t
        only for a model trained to start from a noised neighbour (``neighbour_init``)."""
        if t is None:
            t = torch.full((z_t.shape[0],), STUDENT_TIMESTEP, dtype=torch.long,
                           device=z_t.device)
        h, temb, *skips = self.unet_encoder(z_t, t, ehs)
        if h_edit is not None:
            h = h_edit(h)
        return self.unet_decoder(h, temb, skips, ehs if decoder_ehs is None else decoder_ehs,
                                 z_t, t)
