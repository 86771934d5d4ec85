"""The UNet decoder attending to the retrieved items: decoupled cross-attention in the manner of
IP-Adapter (Ye et al., 2023, "IP-Adapter: text compatible image prompt adapter").

**Not the paper's method.** ImageRAGTurbo injects retrieval only at the mid-block (the
H-adapter, paper Eqs. 4-5). Measured on the shipped student, the decoder hardly reads H-space
(h := 0 moves z_0 by 5 %) but reads its text cross-attention strongly (another prompt's text:
56 %; ``imageragturbo bench sensitivity``). This module gives the retrieved content that
route: in every cross-attention layer of the UNet decoder (``attn2`` of the up blocks'
transformer blocks) the image tokens attend to the text states as before and, separately, to
the neighbours' tokens, and the two results are added before the layer's output projection:

    x = Attn(Q, W_K c, W_V c) + g * Attn(Q, W'_K r, W'_V r)

with c the text states, r the k retrieved items' H features (B, k, C, h, w) as k*h*w tokens
(GroupNorm, a linear map to the text width, a learnt 2-D position code), W'_K and W'_V new
per-layer projections that start as copies of the layer's text projections (as IP-Adapter's
do) and g a per-channel gate that starts at zero, so a fresh module leaves the student exactly
as it was. The encoder is untouched, so the H features cached in the index stay valid.

The decoder receives the neighbours' tokens appended to its text states along the token axis
(``decoder_context``); each processor splits them at the text length. Without neighbours (K =
0) the decoder sees the text states alone and every layer runs its original processor: the
same weights with retrieval off are exactly the student with its decoder LoRA.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from .h_space import POS_FREQS, sincos_2d
from .pretrained import PretrainedModule

FOLDER = "neighbour_attention"


def decoder_cross_attentions(unet) -> dict[str, nn.Module]:
    """The UNet decoder's cross-attention layers, {module name: Attention}, in forward order."""
    from diffusers.models.attention_processor import Attention

    return {f"up_blocks.{name}": m for name, m in unet.up_blocks.named_modules()
            if isinstance(m, Attention) and name.endswith("attn2") and m.is_cross_attention}


def _key(name: str) -> str:
    return name.replace(".", "__")


def _weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight, also when peft wraps it (LoRA on the decoder)."""
    return getattr(linear, "base_layer", linear).weight


class NeighbourAttention(PretrainedModule):
    """The neighbours' token projection and, per decoder cross-attention layer, the decoupled
    key/value projections and gate (module docstring). ``attach(unet)`` installs the
    processors; ``decoder_context(ehs, h_retr)`` builds what the decoder then takes. Saved and
    loaded as diffusers' models are (``pretrained.PretrainedModule``); the processors are not
    part of it, so a loaded module is attached again (``family.attach_neighbour_attention``)."""

    @register_to_config
    def __init__(self, channels: int, context_dim: int, text_len: int,
                 layers: dict[str, int], positional: bool = True,
                 norm_groups: int = 32):
        """``channels``: C of the H features (the UNet's mid-block width); ``context_dim``: the
        text states' width (the UNet's cross_attention_dim); ``text_len``: text tokens before
        the neighbours' (the tokenizer's length); ``layers``: decoder attn2 module name -> its
        inner width; ``positional``: add a learnt projection of each token's 2-D position."""
        super().__init__()
        c, d = channels, context_dim
        groups = min(norm_groups, c)
        while c % groups:
            groups -= 1
        self.norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)
        self.proj = nn.Linear(c, d)
        self.pos_proj = nn.Linear(4 * POS_FREQS, d) if positional else None
        if self.pos_proj is not None:
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.to_k = nn.ModuleDict({_key(n): nn.Linear(d, w, bias=False)
                                   for n, w in layers.items()})
        self.to_v = nn.ModuleDict({_key(n): nn.Linear(d, w, bias=False)
                                   for n, w in layers.items()})
        self.gate = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(w))
                                      for n, w in layers.items()})

    @classmethod
    def for_unet(cls, unet, text_len: int, positional: bool = True) -> NeighbourAttention:
        """A fresh module for ``unet``'s decoder: W'_K, W'_V copied from each layer's text
        projections, gates at zero (the student unchanged)."""
        layers = decoder_cross_attentions(unet)
        if not layers:
            raise ValueError("the UNet decoder has no cross-attention layers to attend from")
        m = cls(channels=int(unet.config.block_out_channels[-1]),
                context_dim=int(unet.config.cross_attention_dim), text_len=int(text_len),
                layers={n: int(_weight(a.to_k).shape[0]) for n, a in layers.items()},
                positional=positional)
        with torch.no_grad():
            for n, a in layers.items():
                m.to_k[_key(n)].weight.copy_(_weight(a.to_k))
                m.to_v[_key(n)].weight.copy_(_weight(a.to_v))
        return m

    def tokens(self, h_retr: torch.Tensor) -> torch.Tensor:
        """(B, k, C, h, w) retrieved H features -> (B, k*h*w, context_dim) tokens."""
        if h_retr.ndim == 4:
            h_retr = h_retr.unsqueeze(1)
        b, k, c, hh, ww = h_retr.shape
        if c != self.config.channels:
            raise ValueError(f"h_retr has {c} channels; this module was built for "
                             f"{self.config.channels}")
        x = self.norm(h_retr.flatten(0, 1).to(self.proj.weight.dtype))
        x = self.proj(x.permute(0, 2, 3, 1).reshape(b * k, hh * ww, c))   # (B*k, hw, D)
        if self.pos_proj is not None:
            x = x + self.pos_proj(sincos_2d(hh, ww, x.device, x.dtype))
        return x.reshape(b, k * hh * ww, -1)

    def decoder_context(self, ehs: torch.Tensor, h_retr: torch.Tensor | None) -> torch.Tensor:
        """What the decoder's cross-attention layers take: the text states (B, L, D), then the
        neighbours' tokens; the text states alone without neighbours."""
        if ehs.shape[1] != self.config.text_len:
            raise ValueError(f"text states have {ehs.shape[1]} tokens; this module splits at "
                             f"{self.config.text_len}")
        if h_retr is None or h_retr.shape[1] == 0:
            return ehs
        return torch.cat([ehs, self.tokens(h_retr).to(ehs.dtype)], dim=1)

    def attach(self, unet) -> None:
        """Install the decoupled processors on ``unet``'s decoder cross-attention layers (the
        module's parameters stay here, not in the UNet's state dict)."""
        layers = decoder_cross_attentions(unet)
        if set(layers) != set(self.config.layers):
            raise ValueError(f"this module was built for decoder layers {sorted(self.config.layers)}"
                             f"; the UNet has {sorted(layers)}")
        for n, a in layers.items():
            base = a.processor.base if isinstance(a.processor, _Processor) else a.processor
            a.set_processor(_Processor(self, _key(n), base))

    @staticmethod
    def detach(unet) -> None:
        """Put every decoder cross-attention layer's original processor back."""
        for a in decoder_cross_attentions(unet).values():
            if isinstance(a.processor, _Processor):
                a.set_processor(a.processor.base)


class _Processor:
    """One decoder cross-attention layer's processor: text attention as before, plus the gated
    attention to the neighbours' tokens (the tokens after ``text_len``). A plain callable, so
    the parameters it uses stay in ``NeighbourAttention``."""

    def __init__(self, owner: NeighbourAttention, key: str, base):
        self.owner, self.key, self.base = owner, key, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        n_text = self.owner.config.text_len
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= n_text:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)
        if (hidden_states.ndim != 3 or attention_mask is not None or attn.spatial_norm
                is not None or attn.group_norm is not None or attn.norm_cross
                or attn.norm_q is not None or attn.norm_k is not None):
            raise NotImplementedError("neighbour attention supports SD-style cross-attention "
                                      "layers only (3-D tokens, no masks or extra norms)")
        text, nb = encoder_hidden_states[:, :n_text], encoder_hidden_states[:, n_text:]
        b = hidden_states.shape[0]
        heads = attn.heads

        def split(x):                                    # (B, N, H*d) -> (B, H, N, d)
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        x = nn.functional.scaled_dot_product_attention(q, split(attn.to_k(text)),
                                                       split(attn.to_v(text)))
        x_nb = nn.functional.scaled_dot_product_attention(
            q, split(self.owner.to_k[self.key](nb)), split(self.owner.to_v[self.key](nb)))
        x = x + self.owner.gate[self.key].view(1, heads, 1, -1) * x_nb
        x = x.transpose(1, 2).reshape(b, -1, heads * x.shape[-1]).to(q.dtype)
        x = attn.to_out[1](attn.to_out[0](x))
        if attn.residual_connection:
            x = x + hidden_states
        return x / attn.rescale_output_factor
