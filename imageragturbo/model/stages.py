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
``HAdapter`` in ``h_space``; this module adds the two ends, ``FlatUNetDecoder`` (the decoder
over the exported graph's flat inputs), ``runner`` (torch modules as ``contract.one_step``'s
run) and ``OneStepStudent``, the one-step forward of training and the PyTorch pipeline. The
stages are chained by ``contract.one_step`` alone, here as in ONNX Runtime and the ensemble.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from imageragturbo.client import contract as C
from imageragturbo.defaults import STUDENT_TIMESTEP, to_unit

from .h_space import HAdapter
from .unet_split import UNetDecoder, UNetEncoder, one_step_z0

__all__ = ["TextEncoder", "UNetEncoder", "HAdapter", "UNetDecoder", "FlatUNetDecoder",
           "VAEDecoder", "OneStepStudent", "runner", "one_step_z0", "images_to_unit"]


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


class FlatUNetDecoder(nn.Module):
    """``UNetDecoder`` (with the one-step update) over flat inputs, in the contract's order
    (``contract.stage_inputs``: h, temb, skip_0..skip_n, encoder_hidden_states, sample,
    timestep) -> z0: the signature of the exported graph and of ``contract.one_step``'s
    decoder call."""

    def __init__(self, decoder: UNetDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, h, temb, *rest):
        *skips, encoder_hidden_states, sample, timestep = rest
        return self.decoder(h, temb, skips, encoder_hidden_states, sample, timestep)


def runner(modules: Mapping[str, Callable], after: Callable[[str], object] | None = None):
    """``contract.one_step``'s run over torch modules (or any callables), each taking its
    stage's inputs in the contract's order; outputs as a tuple. ``after(stage)``: called after
    each stage (a synchronize and a timer, for benchmarks)."""

    def run(stage, *inputs):
        out = modules[stage](*inputs)
        if after is not None:
            after(stage)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


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
        # (a local wrapper, not a submodule: the decoder's parameters are registered once)
        run = runner({C.UNET_ENCODER: self.unet_encoder,
                      C.UNET_DECODER: FlatUNetDecoder(self.unet_decoder)})
        return C.one_step(run, z_t, t, ehs=ehs, edit=h_edit, decoder_ehs=decoder_ehs,
                          decode=False)[1]
