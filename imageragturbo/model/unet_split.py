"""A diffusers ``UNet2DConditionModel`` split at the mid-block (the paper's Fig. 2).

``UNetEncoder``: time embedding, ``conv_in``, down blocks and mid block -> the H-space
feature ``h`` (paper Sec. 3.1: "the feature maps corresponding to the deepest layer of the
UNet"), the time embedding ``temb`` and the skip tensors. ``UNetDecoder``: the up blocks and
output layers from (h, temb, skips), then, given z_t and t, the one-step update to z_0.
Both share the wrapped UNet's modules (no copies), so the split is exact: split(x) == unet(x).

Supported: the configurations SD 2.1 / SD-Turbo and the tiny ShapesWorld family use (no class
embeddings, no added conditioning, no ControlNet/T2I residuals). Anything else is refused at
construction with a clear error rather than silently computed wrong.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_supported(unet) -> None:
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "addition_embed_type": cfg.addition_embed_type,
        "encoder_hid_dim_type": getattr(cfg, "encoder_hid_dim_type", None),
    }
    bad = {k: v for k, v in unsupported.items() if v is not None}
    if bad or cfg.center_input_sample:
        raise ValueError(f"UNet split supports SD-style text-conditioned UNets only; got {bad}"
                         f"{' and center_input_sample' if cfg.center_input_sample else ''}")


class UNetEncoder(nn.Module):
    """f_enc: (z_t, t, text states) -> (h, temb, *skips). Paper Sec. 3.2: h_t = f_enc(tau(p), t, z_t)."""

    def __init__(self, unet):
        super().__init__()
        _check_supported(unet)
        self.unet = unet

    @property
    def num_skips(self) -> int:
        u = self.unet
        return 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in u.down_blocks)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u = self.unet
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)  # (B, C0)
        emb = u.time_embedding(t_emb, None)                          # (B, 4*C0)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        x = u.conv_in(sample)                                        # (B, C0, H, W)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb,
                               encoder_hidden_states=encoder_hidden_states)
            else:
                x, res = block(hidden_states=x, temb=emb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                x = u.mid_block(x, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                x = u.mid_block(x, emb)
        return (x, emb, *skips)  # h: (B, C_mid, H/2^n, W/2^n)


class UNetDecoder(nn.Module):
    """f_dec: (h, temb, skips, text states) -> the UNet's output (epsilon or v); given also
    ``sample`` (z_t) and ``timestep``, the one-step z_0 (``one_step_z0``, paper Eq. 1 solved
    for z_0), which needs the scheduler's ``alphas_cumprod``."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor | None = None,
                 prediction_type: str = "epsilon"):
        super().__init__()
        _check_supported(unet)
        self.unet = unet
        self.prediction_type = prediction_type
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(),
                                 persistent=False)
        else:
            self.alphas_cumprod = None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: tuple[torch.Tensor, ...],
                encoder_hidden_states: torch.Tensor, sample: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None) -> torch.Tensor:
        out = self.predict(h, temb, skips, encoder_hidden_states)      # (B, C_out, H, W)
        if sample is None:
            return out
        if self.alphas_cumprod is None or timestep is None:
            raise ValueError("the one-step update needs the timestep and the scheduler's "
                             "alphas_cumprod (UNetDecoder(unet, alphas_cumprod))")
        return one_step_z0(sample, timestep, out, self.alphas_cumprod, self.prediction_type)

    def predict(self, h: torch.Tensor, temb: torch.Tensor, skips: tuple[torch.Tensor, ...],
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The up blocks and output layers: the UNet's epsilon (or v) prediction."""
        u = self.unet
        x = h
        skips = tuple(skips)
        n_up = len(u.up_blocks)
        for i, block in enumerate(u.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            # Latents whose side is not a multiple of 2^n: upsample to the next skip's size
            # (as UNet2DConditionModel does); otherwise the plain 2x upsampler.
            size = None
            if i < n_up - 1 and skips and tuple(skips[-1].shape[2:]) != tuple(
                    2 * d for d in x.shape[2:]):
                size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=temb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=size)
            else:
                x = block(hidden_states=x, temb=temb, res_hidden_states_tuple=res,
                          upsample_size=size)
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)  # (B, C_out, H, W)


def one_step_z0(z_t: torch.Tensor, timestep: torch.Tensor, model_out: torch.Tensor,
                alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """z_0 from one model evaluation (paper Eq. 1 solved for z_0).

    With z_t = alpha_t z_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t):
    epsilon prediction: z_0 = (z_t - sigma_t eps) / alpha_t; v prediction: z_0 = alpha_t z_t -
    sigma_t v. ``z_t`` is the model input (EulerDiscrete's scale_model_input already applied),
    so this equals one Euler step to sigma = 0 at SD-Turbo's t = 999.
    """
    t = timestep.long().reshape(-1)
    abar = alphas_cumprod.to(z_t.device)[t].to(torch.float32)
    alpha = abar.sqrt().view(-1, 1, 1, 1).to(z_t.dtype)            # (B, 1, 1, 1)
    sigma = (1 - abar).sqrt().view(-1, 1, 1, 1).to(z_t.dtype)
    if prediction_type == "epsilon":
        return (z_t - sigma * model_out) / alpha
    if prediction_type == "v_prediction":
        return alpha * z_t - sigma * model_out
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def split_unet(unet, alphas_cumprod: torch.Tensor | None = None,
               prediction_type: str = "epsilon") -> tuple[UNetEncoder, UNetDecoder]:
    return UNetEncoder(unet), UNetDecoder(unet, alphas_cumprod, prediction_type)
