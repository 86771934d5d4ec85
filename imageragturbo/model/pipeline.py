"""PyTorch pipelines over ``Components``: the multi-step teacher with classifier-free
guidance, and the one-step student with optional retrieval (H-adapter or slerp injection).

The initial noise comes from NumPy (``noise.initial_noise``), never from torch's generator, so
the ONNX Runtime pipeline and the Triton ensemble draw the very same z_T for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imageragturbo.client import contract as C
from imageragturbo.defaults import STUDENT_TIMESTEP, from_unit
from imageragturbo.runtime.request import initial_noise

from .family import Components
from .h_space import slerp_inject
from .stages import OneStepStudent, TextEncoder, VAEDecoder

__all__ = ["STUDENT_TIMESTEP", "decode_latents", "encode_prompt", "latent_shape",
           "student_generate", "teacher_generate", "TorchStudent"]


def latent_shape(c: Components, image_size: int | None = None) -> tuple[int, int, int]:
    factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    size = image_size or c.vae.config.sample_size
    return (c.unet.config.in_channels, size // factor, size // factor)


@torch.no_grad()
def encode_prompt(c: Components, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states for cross-attention (B, L, D) and the L2-normalised pooled (EOS) embedding
    (B, D), the retrieval key (paper Sec. 4.1: the SD model's own CLIP text features)."""
    return TextEncoder(c.text_encoder)(tokenize(c.tokenizer, prompts))


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L) as a tensor: ``contract.tokenize``, the call every stage shares."""
    return C.tokenize(tokenizer, prompts, return_tensors="pt")


@torch.no_grad()
def decode_latents(c: Components, z0: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 images (B, H, W, 3)."""
    return to_uint8_images(VAEDecoder(c.vae)(z0))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1], any float dtype or device -> uint8 (B, H, W, 3) on the host."""
    x = from_unit(x.float().clamp(-1, 1)).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def student_generate(c: Components, prompts: Sequence[str], seeds: Sequence[int],
                     h_retr: torch.Tensor | None = None, lam: torch.Tensor | None = None,
                     slerp_w: float | None = None, return_latents: bool = False,
                     z_init: torch.Tensor | None = None, t_init: int | None = None):
    """One step at t=999 through the split UNet. With ``h_retr`` (B, k, C, h, w): the
    H-adapter (when the model has one and ``slerp_w`` is None) or slerp injection of the
    top-1 neighbour with target weight ``slerp_w`` (paper Eq. 3). With ``z_init`` (B, C, h, w)
    and ``t_init`` (beyond the paper, for a model trained with ``neighbour_init``): the step
    starts at t_init from z_init (the top-1 neighbour's latent) noised with the seed's noise."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if (z_init is None) != (t_init is None):
        raise ValueError("z_init and t_init go together")
    ehs, _ = encode_prompt(c, prompts)
    z = torch.from_numpy(initial_noise(seeds, latent_shape(c))).to(ehs.dtype)
    t = None
    if z_init is not None:
        z = noised(c, z_init.to(z.dtype), z, t_init)
        t = torch.full((len(z),), int(t_init), dtype=torch.long)
    h_edit = None
    if h_retr is not None:
        if slerp_w is not None:
            def h_edit(h):
                return slerp_inject(h, h_retr[:, 0].to(h.dtype), slerp_w)
        elif c.h_adapter is not None:
            if lam is None:
                raise ValueError("the H-adapter needs lam (B,): the retrieval similarity")

            def h_edit(h):
                return c.h_adapter(h, h_retr.to(h.dtype), lam)
        elif c.neighbour_attention is None:
            raise ValueError("retrieved features given, but the model has no H-adapter, no "
                             "decoder neighbour attention and no slerp strength was set")
    decoder_ehs = None
    if h_retr is not None and slerp_w is None and c.neighbour_attention is not None:
        decoder_ehs = c.neighbour_attention.decoder_context(ehs, h_retr.to(ehs.dtype))
    student = OneStepStudent(c.unet, c.alphas_cumprod, c.scheduler.config.prediction_type)
    z0 = student(z, ehs, h_edit, decoder_ehs, t)
    images = decode_latents(c, z0)
    return (images, z0) if return_latents else images


class TorchStudent:
    """The one-step student of a model on PyTorch with NumPy in and out, the same interface as
    the ONNX Runtime pipeline offers ``imageragturbo generate`` (its ``--backend torch``)."""

    def __init__(self, model, threads: int | None = None):
        from .family import load_components

        if threads:
            torch.set_num_threads(threads)
        self.c = load_components(model)
        self.text_dim = int(self.c.text_encoder.config.hidden_size)
        self.has_adapter = self.c.h_adapter is not None
        self.neighbour_start = self.c.neighbour_start
        cfg = self.c.unet.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        _, lh, lw = latent_shape(self.c)
        self.h_shape = (int(cfg.block_out_channels[-1]), lh // down, lw // down)  # (C, h', w')

    def pooled(self, prompts: Sequence[str]) -> np.ndarray:
        return encode_prompt(self.c, prompts)[1].numpy()

    def generate(self, prompts, seeds, h_retr=None, lam=None, slerp_w=None,
                 z_init=None) -> np.ndarray:
        ht = None if h_retr is None else torch.from_numpy(np.asarray(h_retr))
        lt = None if lam is None else torch.from_numpy(np.asarray(lam))
        start = {}
        if z_init is not None:
            if self.neighbour_start is None:
                raise ValueError("z_init given, but this model has no neighbour start")
            start = {"z_init": torch.from_numpy(np.asarray(z_init, np.float32)),
                     "t_init": self.neighbour_start["timestep"]}
        return student_generate(self.c, prompts, seeds, h_retr=ht, lam=lt, slerp_w=slerp_w,
                                **start)


def ddim_scheduler(c: Components):
    from diffusers import DDIMScheduler

    cfg = dict(c.scheduler.config)
    return DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False,
                                     timestep_spacing="trailing")


@torch.no_grad()
def teacher_sample_latents(c: Components, unet, ehs: torch.Tensor, ehs_uncond: torch.Tensor,
                           z: torch.Tensor, steps: int, guidance: float,
                           z_init: torch.Tensor | None = None,
                           strength: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, trailing spacing, no sample clipping: these are latents)
    with classifier-free guidance. z: (B, C, h, w) -> z_0.

    With ``z_init`` (B, C, h, w) clean latents and ``strength`` < 1: SDEdit (Meng et al.,
    2022): the last ``round(strength * steps)`` steps only, from z_init noised with ``z`` as the
    noise to the first of them, so the sample keeps z_init's layout where the prompt allows."""
    sched = ddim_scheduler(c)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if z_init is not None and strength < 1.0:
        timesteps = timesteps[steps - sdedit_keep(steps, strength):]
        z = sched.add_noise(z_init, z, timesteps[:1].expand(len(z)))
    cond = torch.cat([ehs_uncond.expand(len(z), -1, -1), ehs])
    for t in timesteps:
        eps_u, eps_c = unet(torch.cat([z, z]), t, cond).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        z = sched.step(eps, t, z).prev_sample
    return z


def sdedit_keep(steps: int, strength: float) -> int:
    """How many of ``steps`` DDIM steps an SDEdit at ``strength`` runs (the last ones)."""
    return max(1, round(strength * steps))


def sdedit_timestep(c: Components, steps: int, strength: float) -> int:
    """The timestep an SDEdit of ``steps`` DDIM steps (trailing spacing) at ``strength``
    starts from: where ``teacher_sample_latents`` noises ``z_init`` to, and where a
    ``neighbour_init`` student starts from its noised neighbour."""
    sched = ddim_scheduler(c)
    sched.set_timesteps(steps)
    return int(sched.timesteps[steps - sdedit_keep(steps, strength)])


def neighbour_start_of(c: Components, record: str | Path) -> dict | None:
    """A retrieval fine-tuning run's start (``adapter_training.json`` of a run's export or of
    the model folder it was installed into): for a run trained with ``neighbour_init`` (beyond
    the paper), {"timestep": t, "alpha_bar": alphas_cumprod[t]}: with retrieval on, its one
    step starts at t from the top-1 neighbour's latent noised with z_T. None otherwise."""
    import json

    record = Path(record)
    cfg = json.loads(record.read_text()).get("config", {}) if record.is_file() else {}
    if not cfg.get("neighbour_init"):
        return None
    t = sdedit_timestep(c, int(cfg["synth_steps"]), float(cfg["neighbour_sdedit"]))
    return {"timestep": t, "alpha_bar": float(c.alphas_cumprod[t])}


def noised(c: Components, z_init: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """z_init noised to timestep t with noise eps (paper Eq. 1; DDPM's forward process), in
    float32 as the served retriever computes it (``runtime.request.neighbour_start``)."""
    abar = float(c.alphas_cumprod[int(t)])
    return (np.float32(np.sqrt(abar)) * z_init.float()
            + np.float32(np.sqrt(1.0 - abar)) * eps.float()).to(eps.dtype)


@torch.no_grad()
def teacher_generate(c: Components, prompts: Sequence[str], seeds: Sequence[int],
                     steps: int = 50, guidance: float = 5.0, return_latents: bool = False):
    """The multi-step teacher (SD 2.1's role): N DDIM steps with classifier-free guidance."""
    if c.teacher_unet is None:
        raise ValueError(f"model {c.name!r} has no teacher_unet")
    ehs, _ = encode_prompt(c, prompts)
    unc, _ = encode_prompt(c, [""])
    z = torch.from_numpy(initial_noise(seeds, latent_shape(c))).to(ehs.dtype)
    z0 = teacher_sample_latents(c, c.teacher_unet, ehs, unc, z, steps, guidance)
    images = decode_latents(c, z0)
    return (images, z0) if return_latents else images
