"""One optimisation step of each training stage, on a given batch (the smoke tests call them
on a fixed batch), and what they share: the training data, image scaling, light
augmentation, an EMA of parameters and the one-step student module. The recipes
(``base.Recipe``, ``adapter.AdapterRun``) draw the batches and run the loops."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imageragturbo import shapesworld as sw
from imageragturbo.model.clip_scorer import ClipScorer
from imageragturbo.model.stages import (
    OneStepStudent,  # noqa: F401 - the recipes' import
    images_to_unit,
)

from . import ladd

# ----------------------------------------------------------------------------- utilities


class EMA:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - self.decay)


# ----------------------------------------------------------------------------- data


def training_data(cfg, cache: Path) -> tuple[np.ndarray, list[str]]:
    """ShapesWorld training renders (N, 64, 64, 3) uint8 and captions (``cfg.n_train`` items of
    seed ``cfg.seed``), cached in the run."""
    img_path, cap_path = cache / "train_images.npy", cache / "train_captions.json"
    if img_path.exists() and cap_path.exists():
        return np.load(img_path), json.loads(cap_path.read_text())
    from tqdm import tqdm

    items = sw.make_split("train", cfg.n_train, cfg.seed)
    imgs = np.stack([np.asarray(sw.render(it.scene)) for it in tqdm(items, desc="render")])
    caps = [it.caption for it in items]
    cache.mkdir(parents=True, exist_ok=True)
    np.save(img_path, imgs)
    cap_path.write_text(json.dumps(caps))
    return imgs, caps


# uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], as the recipes know it
to_unit = images_to_unit


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mild blur and noise on half of a batch: the CLIP-score towers must read generated
    images too, which are blurrier than renders."""
    b = x.shape[0]
    sel = torch.from_numpy(rng.random(b) < 0.5)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k,
                                   groups=3)
    noisy = blurred + torch.from_numpy(rng.normal(0, 0.05, x.shape).astype(np.float32))
    return torch.where(sel.view(-1, 1, 1, 1), noisy, x)


# ----------------------------------------------------------------------------- stage steps
# Each ``*_step`` does one optimisation step on a given batch and returns its losses; the
# smoke tests call them on a fixed batch.


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def clip_step(text_encoder, scorer: ClipScorer, opt, ids: torch.Tensor,
              images: torch.Tensor, backward=_backward) -> dict:
    from open_clip.loss import ClipLoss

    pooled = text_encoder(ids).pooler_output                             # (B, D)
    t = scorer.encode_text(pooled)
    i = scorer.encode_image(images)
    loss = ClipLoss()(i, t, scorer.logit_scale.exp().clamp(max=100))
    opt.zero_grad(set_to_none=True)
    backward(loss)
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return {"loss": loss.item()}


def vae_step(vae, opt, x: torch.Tensor, kl_weight: float = 1e-6, backward=_backward) -> dict:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    l1 = (rec - x).abs().mean()
    mse = ((rec - x) ** 2).mean()
    kl = post.kl().mean()
    loss = l1 + mse + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    backward(loss)
    nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return {"loss": loss.item(), "mse": mse.item()}


def teacher_step(unet, opt, z0: torch.Tensor, ehs: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, alphas_cumprod: torch.Tensor, backward=_backward,
                 min_snr: float = 0.0, anchor_loss: torch.Tensor | None = None) -> dict:
    """One epsilon-prediction step. ``min_snr`` > 0: Min-SNR-gamma loss weighting (Hang et al.,
    2023), w(t) = min(SNR(t), gamma) / SNR(t) for epsilon targets, which stops the nearly
    clean timesteps (SNR up to ~1,200 here) from taking the gradient that the noisy ones, where
    the layout and the text's objects are decided, need."""
    zt = ladd.add_noise(z0, noise, t, alphas_cumprod)
    err = ((unet(zt, t, ehs).sample - noise) ** 2).mean((1, 2, 3))
    if min_snr > 0:
        ab = alphas_cumprod.to(err.device)[t]
        snr = ab / (1 - ab)
        err = err * torch.clamp(snr, max=min_snr) / snr
    loss = err.mean()
    opt.zero_grad(set_to_none=True)
    backward(loss if anchor_loss is None else loss + anchor_loss)
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    out = {"loss": loss.item()}
    if anchor_loss is not None:
        out["anchor"] = anchor_loss.item()
    return out


def ladd_step(student: OneStepStudent, disc: ladd.LADDDiscriminator, opt_g, opt_d, z_t,
              z0_teacher, ehs, pooled, s, eps_s, alphas_cumprod, distill_weight: float = 2.5,
              h_edit=None, backward=_backward, sync_heads=None, perceptual=None,
              perceptual_weight: float = 0.0, adv_weight: float = 1.0,
              decoder_ehs=None, t=None) -> dict:
    """One generator and one discriminator update, paper Eq. 10: L_adv (Eqs. 6-7) + alpha
    L_distill (Eq. 8) + beta L_latentLPIPS (Eq. 9, when ``perceptual(z0_hat, z0)`` is given).
    ``sync_heads(params)`` averages the heads' gradients across processes (the heads run three
    times per step, so they are not DDP-wrapped). ``adv_weight`` scales L_adv (1 in Eq. 10).
    ``decoder_ehs``: the decoder's cross-attention context and ``t`` each input's timestep
    (``OneStepStudent``; None: t = 999)."""
    z0_hat = student(z_t, ehs, h_edit, decoder_ehs, t)
    l_dist = ladd.distill_loss(z0_hat, z0_teacher)
    loss_g = distill_weight * l_dist
    out = {}
    if adv_weight > 0:
        fake = disc(ladd.add_noise(z0_hat, eps_s, s, alphas_cumprod), s, ehs, pooled)
        l_adv = ladd.g_adv_loss(fake)
        loss_g = loss_g + adv_weight * l_adv
        out["g_adv"] = l_adv.item()
    if perceptual is not None and perceptual_weight > 0:
        l_lp = perceptual(z0_hat, z0_teacher)
        loss_g = loss_g + perceptual_weight * l_lp
        out["lpips"] = l_lp.item()
    opt_g.zero_grad(set_to_none=True)
    backward(loss_g)
    nn.utils.clip_grad_norm_([p for g in opt_g.param_groups for p in g["params"]], 1.0)
    opt_g.step()

    out["distill"] = l_dist.item()
    if adv_weight <= 0:
        return out  # no adversarial term: the discriminator has nothing to teach
    real = disc(ladd.add_noise(z0_teacher, eps_s, s, alphas_cumprod), s, ehs, pooled)
    fake = disc(ladd.add_noise(z0_hat.detach(), eps_s, s, alphas_cumprod), s, ehs, pooled)
    loss_d = ladd.d_hinge_loss(real, fake)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    if sync_heads is not None:
        sync_heads(list(disc.trainable_parameters()))
    opt_d.step()
    return {**out, "d": loss_d.item()}


