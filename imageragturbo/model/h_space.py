"""Injecting retrieved content into the UNet's H-space (paper Secs. 3.2 and 3.3).

``slerp_inject``: training-free spherical interpolation, paper Eq. 3.
``HAdapter``: the trainable cross-attention adapter, paper Eqs. 4-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from .pretrained import PretrainedModule, takes_config


def slerp_inject(h_tgt: torch.Tensor, h_retr: torch.Tensor, w: float | torch.Tensor,
                 eps: float = 1e-4) -> torch.Tensor:
    """Paper Eq. 3: h_blend = sin((1-w) O)/sin O * h_retr + sin(w O)/sin O * h_tgt,
    O = arccos(<h_tgt, h_retr>) over each sample's flattened C*H*W vector.

    ``w`` is the target's weight: w=1 returns h_tgt, w=0 the retrieved feature rescaled to the
    target's norm (the two are put on one sphere first, so the blend keeps the target's norm).
    Computed in fp32; where the angle is ~0 (|sin O| < eps) it falls back to lerp.
    h_tgt, h_retr: (B, C, H, W); w: scalar or (B,).
    """
    if h_tgt.shape != h_retr.shape:
        raise ValueError(f"h_tgt {tuple(h_tgt.shape)} and h_retr {tuple(h_retr.shape)} differ")
    dtype = h_tgt.dtype
    a = h_tgt.float().flatten(1)                                    # (B, N)
    b = h_retr.float().flatten(1)                                   # (B, N)
    na = a.norm(dim=1, keepdim=True).clamp_min(1e-12)               # (B, 1)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) * na       # retrieved at target's norm
    w = torch.as_tensor(w, dtype=torch.float32, device=a.device).reshape(-1, 1)  # (B|1, 1)
    cos = ((a * b).sum(1, keepdim=True) / (na * na)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    small = so.abs() < eps
    safe = torch.where(small, torch.ones_like(so), so)
    slerp = (torch.sin((1 - w) * omega) / safe) * b + (torch.sin(w * omega) / safe) * a
    lerp = (1 - w) * b + w * a
    out = torch.where(small, lerp, slerp)
    return out.view_as(h_tgt).to(dtype)


@dataclass
class HAdapterConfig:
    """The H-adapter's size (what ``adapter_config_for`` computes); ``HAdapter(config)`` builds
    it, and its fields are the adapter's ``config.json``."""

    channels: int            # C of the H-space feature (SD 2.1: 1280; tiny-shapes: mid-block width)
    num_heads: int = 8       # attention heads (SD 2.1 size: 20 heads of 64)
    head_dim: int = 64       # width of one head
    ff_mult: int = 4         # GEGLU feed-forward expansion
    norm_groups: int = 32    # GroupNorm groups on h before the block
    positional: bool = False  # add a learnt projection of 2-D sin-cos positions to the tokens

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


class HAdapter(PretrainedModule):
    """g_phi of paper Eqs. 4-5, as an SD-style transformer block on H-space tokens.

    h = h_tgt + lambda * g(h_tgt, h_retr). Target tokens (B, H*W, C) attend to themselves, then
    to the k retrieved items' tokens concatenated along the key/value axis (B, k*H*W, C), with
    Q = W_Q h_tgt, K = W_K h_retr, V = W_V h_retr (Eq. 4), then a feed-forward. The output
    projection is zero-initialised, so a fresh adapter is the identity and training starts
    from the student exactly. lambda (B,) is the cosine similarity of the target and retrieved
    text embeddings (Eq. 5). At SD 2.1 width (1280 channels, 20 heads of 64) this has about
    36 M parameters, the paper's "36M, 4%".

    Built from an ``HAdapterConfig`` or its fields as keyword arguments; saved and loaded as
    diffusers' models are (``pretrained.PretrainedModule``).
    """

    @takes_config
    @register_to_config
    def __init__(self, channels: int, num_heads: int = HAdapterConfig.num_heads,
                 head_dim: int = HAdapterConfig.head_dim, ff_mult: int = HAdapterConfig.ff_mult,
                 norm_groups: int = HAdapterConfig.norm_groups,
                 positional: bool = HAdapterConfig.positional):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        c, d = channels, num_heads * head_dim
        groups = min(norm_groups, c)
        while c % groups:
            groups -= 1
        self.norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(c, d)
        self.block = BasicTransformerBlock(
            d, num_heads, head_dim, cross_attention_dim=d,
            activation_fn="geglu", ff_inner_dim=ff_mult * d,
        )
        self.proj_out = nn.Linear(d, c)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # Cross-attention sees the neighbours' tokens as a set; with ``positional`` every token
        # (target and retrieved alike) also carries where it sits, so layout can be copied.
        self.pos_proj = nn.Linear(4 * POS_FREQS, d) if positional else None
        if self.pos_proj is not None:
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        x = self.norm(h).permute(0, 2, 3, 1).reshape(b, hh * ww, c)   # (B, HW, C)
        x = self.proj_in(x)                                           # (B, HW, D)
        if self.pos_proj is not None:
            x = x + self.pos_proj(sincos_2d(hh, ww, x.device, x.dtype))  # (HW, D) broadcast
        return x

    def delta(self, h_tgt: torch.Tensor, h_retr: torch.Tensor) -> torch.Tensor:
        """g(h_tgt, h_retr): (B, C, H, W), (B, k, C, H, W) -> (B, C, H, W)."""
        b, c, hh, ww = h_tgt.shape
        if h_retr.ndim == 4:
            h_retr = h_retr.unsqueeze(1)
        if h_retr.shape[0] != b or h_retr.shape[2] != c:
            raise ValueError(f"h_retr {tuple(h_retr.shape)} does not match h_tgt "
                             f"{tuple(h_tgt.shape)}: expected (B, k, C, h, w)")
        k = h_retr.shape[1]
        q = self._tokens(h_tgt)                                                   # (B, HW, D)
        kv = self._tokens(h_retr.flatten(0, 1).to(h_tgt.dtype))                   # (B*k, hw, D)
        kv = kv.reshape(b, k * kv.shape[1], kv.shape[2])                          # (B, k*hw, D)
        x = self.block(q, encoder_hidden_states=kv)                               # (B, HW, D)
        x = self.proj_out(x)                                                      # (B, HW, C)
        return x.reshape(b, hh, ww, c).permute(0, 3, 1, 2)                       # (B, C, H, W)

    def forward(self, h_tgt: torch.Tensor, h_retr: torch.Tensor,
                lam: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 5: h = h_tgt + lambda * g(h_tgt, h_retr); lam: (B,)."""
        return h_tgt + lam.reshape(-1, 1, 1, 1).to(h_tgt.dtype) * self.delta(h_tgt, h_retr)


POS_FREQS = 4  # sin-cos frequencies per axis of the adapter's positional code


def sincos_2d(hh: int, ww: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H*W, 4 * POS_FREQS): sin and cos of each token's row and column in [0, 1] at
    POS_FREQS octaves (resolution-free, so one adapter serves any latent size)."""
    ys = torch.linspace(0, 1, hh, device=device, dtype=torch.float32)
    xs = torch.linspace(0, 1, ww, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    f = (2.0 ** torch.arange(POS_FREQS, device=device, dtype=torch.float32)) * torch.pi
    arg = torch.cat([yy.reshape(-1, 1) * f, xx.reshape(-1, 1) * f], dim=1)  # (HW, 2F)
    return torch.cat([arg.sin(), arg.cos()], dim=1).to(dtype)


def sd21_adapter_config() -> HAdapterConfig:
    """The adapter at SD 2.1 / SD-Turbo width: mid-block 1280 channels, 20 heads of 64."""
    return HAdapterConfig(channels=1280, num_heads=20, head_dim=64)


def adapter_config_for(unet) -> HAdapterConfig:
    """The adapter sized for a UNet's mid-block (see ``adapter_config_for_channels``)."""
    return adapter_config_for_channels(int(unet.config.block_out_channels[-1]))


def adapter_config_for_channels(channels: int) -> HAdapterConfig:
    """The one sizing rule of the H-adapter, for a mid-block of ``channels``: heads of 64 at SD
    width (1280 -> 20 heads, 36.1 M parameters, 4.2 % of SD 2.1's 866 M UNet), four heads on
    narrow models (tiny-shapes: 96 channels -> 4 heads of 24, 0.20 M parameters, 5.5 % of its
    3.7 M UNet)."""
    if channels >= 640 and channels % 64 == 0:
        return HAdapterConfig(channels=channels, num_heads=channels // 64, head_dim=64)
    if channels % 4:
        raise ValueError(f"cannot size an adapter for {channels} channels (not a multiple of 4)")
    return HAdapterConfig(channels=channels, num_heads=4, head_dim=channels // 4)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
