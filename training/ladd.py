"""Latent adversarial distillation (paper Sec. 3.4, Fig. 4; Sauer et al., LADD).

The discriminator is the frozen teacher UNet encoder followed by trainable, spectrally
normalised heads on its multi-stage features (each down block's output and the mid-block h),
applied to noisy latents z_s = alpha_s z_0 + sigma_s eps at a random s. Each head is
conditioned on the prompt by a projection term (the pooled text embedding against the
head's pooled features). Losses: hinge (Eqs. 6-7) and smooth-L1 distillation (Eq. 8).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from imageragturbo.model.unet_split import UNetEncoder


def stage_features(encoder: UNetEncoder, z: torch.Tensor, t: torch.Tensor,
                   ehs: torch.Tensor) -> list[torch.Tensor]:
    """The teacher encoder's multi-stage features: each down block's last output, then h."""
    h, _temb, *skips = encoder(z, t, ehs)
    feats, i = [], 1  # skips[0] is conv_in's output
    for block in encoder.unet.down_blocks:
        i += len(block.resnets) + (1 if block.downsamplers else 0)
        feats.append(skips[i - 1])
    return feats + [h]


class DiscriminatorHead(nn.Module):
    """One stage: SN conv 3x3 -> LeakyReLU -> SN conv 1x1 to a logit map, plus a projection
    term <W_c pooled_text, GAP(features)> for prompt conditioning."""

    def __init__(self, channels: int, text_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.conv = spectral_norm(nn.Conv2d(channels, hidden, 3, padding=1))
        self.act = nn.LeakyReLU(0.2)
        self.out = spectral_norm(nn.Conv2d(hidden, 1, 1))
        self.cond = spectral_norm(nn.Linear(text_dim, hidden))

    def forward(self, f: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(f))                                   # (B, Hd, h, w)
        logit = self.out(x).mean(dim=(1, 2, 3))                      # (B,)
        proj = (x.mean(dim=(2, 3)) * self.cond(pooled_text)).sum(-1) / x.shape[1] ** 0.5
        return logit + proj                                          # (B,)


class LADDDiscriminator(nn.Module):
    """D_k of Eqs. 6-7: frozen teacher encoder + one trainable head per stage."""

    def __init__(self, teacher_unet, text_dim: int):
        super().__init__()
        self.encoder = UNetEncoder(teacher_unet)
        self.encoder.requires_grad_(False)
        chans = [b.resnets[-1].out_channels for b in teacher_unet.down_blocks]
        chans.append(teacher_unet.mid_block.resnets[-1].out_channels)
        self.heads = nn.ModuleList(DiscriminatorHead(c, text_dim) for c in chans)

    def trainable_parameters(self):
        return self.heads.parameters()

    def forward(self, z_s: torch.Tensor, s: torch.Tensor, ehs: torch.Tensor,
                pooled_text: torch.Tensor) -> list[torch.Tensor]:
        feats = stage_features(self.encoder, z_s, s, ehs)
        return [head(f, pooled_text) for head, f in zip(self.heads, feats)]


def add_noise(z0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """z_s = alpha_s z_0 + sigma_s eps (paper Eq. 1, the discriminator's noisy input)."""
    abar = alphas_cumprod.to(z0.device)[s.long()].view(-1, 1, 1, 1).to(z0.dtype)
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def d_hinge_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 6: sum_k E[max(0, 1 - D_k(z_s))] + E[max(0, 1 + D_k(z^_s))]."""
    return sum(torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake))


def g_adv_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 7: -sum_k E[D_k(z^_s)]."""
    return -sum(f.mean() for f in fake)


def distill_loss(z0_hat: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Eq. 8: smooth L1 (Huber with delta 1) between the student's and the teacher's z_0."""
    return nn.functional.smooth_l1_loss(z0_hat, z0, beta=1.0)


# ----------------------------------------------------------------------------- Eq. 9


def paired_augment(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator,
                   shift: int = 2, cutout: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """T of paper Eq. 9: one random differentiable augmentation applied to both latents alike:
    a horizontal flip (half the time), a translation by up to ``shift`` latent pixels
    (replicate padding, then a crop), and a cutout that zeroes one square of side
    ``cutout`` x the latent's side. a, b: (B, C, h, w)."""
    _, _, hh, ww = a.shape
    x = torch.stack([a, b])                                                  # (2, B, C, h, w)
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    if shift:
        pad = nn.functional.pad(x.flatten(0, 1), (shift,) * 4, mode="replicate")
        dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=gen))
        x = pad[..., dy:dy + hh, dx:dx + ww].reshape(x.shape)
    side = max(1, int(round(cutout * min(hh, ww))))
    if cutout > 0:
        y0 = int(torch.randint(0, hh - side + 1, (), generator=gen))
        x0 = int(torch.randint(0, ww - side + 1, (), generator=gen))
        mask = torch.ones(hh, ww, device=x.device, dtype=x.dtype)
        mask[y0:y0 + side, x0:x0 + side] = 0
        x = x * mask
    return x[0], x[1]


class LatentPerceptual(nn.Module):
    """F of paper Eq. 9, the latent perceptual distance, built from what this project trains:
    the frozen teacher UNet encoder at t = 0 with the empty prompt, read at every stage (each
    down block's output and the mid-block h), each feature unit-normalised over channels as
    LPIPS does, squared differences summed over channels, averaged over positions and over
    stages. E-LatentLPIPS (the paper's F) cannot be downloaded here and is non-commercial; the
    teacher's encoder is the network that has learnt these latents best, and the same one the
    discriminator reads, so the two losses look at the same features (here without noise)."""

    def __init__(self, encoder: UNetEncoder, empty_text: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.register_buffer("empty_text", empty_text.detach().float().clone(), persistent=False)

    def forward(self, z_hat: torch.Tensor, z: torch.Tensor,
                gen: torch.Generator | None = None) -> torch.Tensor:
        if gen is not None:
            z_hat, z = paired_augment(z_hat, z, gen)
        b = z.shape[0]
        t = torch.zeros(2 * b, dtype=torch.long, device=z.device)
        ehs = self.empty_text.to(z.dtype).expand(2 * b, -1, -1)
        feats = stage_features(self.encoder, torch.cat([z_hat, z]), t, ehs)
        loss = z.new_zeros(())
        for f in feats:
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            fa, fb = f[:b], f[b:]
            loss = loss + (fa - fb.detach()).pow(2).sum(1).mean()
        return loss / len(feats)
