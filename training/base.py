"""The tiny ShapesWorld family, trained here on a CPU: the offline stand-in for SD 2.1 (teacher)
and SD-Turbo (one-step student).

Stages (``imageragturbo train base``), each resumable from its last checkpoint:

1. ``clip``: the CLIP text encoder (transformers ``CLIPTextModel``, CLIP's BPE tokenizer) and
   an image tower, trained contrastively with open_clip's ``ClipLoss``. The image tower is
   the CLIP-score analogue and FD's features.
2. ``vae``: ``AutoencoderKL`` (64x64 RGB <-> 16x16x4), L1 + MSE + a small KL, on 32x32
   random crops (the model is fully convolutional; crops cost a quarter of full images).
3. ``teacher``: ``UNet2DConditionModel``, epsilon prediction on SD 2.1's noise schedule,
   Min-SNR-5 weighting, 10% caption dropout for classifier-free guidance, EMA weights. The
   text encoder trains with it (the contrastive loss leaves every token state but the EOS
   untrained) while an MSE term holds its pooled output, the retrieval key and the CLIP-score
   text side, to the clip stage's; it is frozen from then on.
4. ``synth``: the teacher's samples (DDIM, CFG) for training prompts, from stored z_T:
   (z_T, prompt, z_0) triplets, the synthetic data of paper Sec. 4.1.
5. ``student``: one step at t=999, initialised from the teacher, trained with latent
   adversarial distillation (paper Eqs. 6-8, ``training.ladd``).
6. ``export``: a diffusers folder (fp16 safetensors + configs) with ``teacher_unet`` and
   ``clip_scorer`` subfolders, which ``imageragturbo.model.load_components`` loads.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imageragturbo.defaults import DEFAULT_MODEL
from imageragturbo.model import family
from imageragturbo.model.clip_scorer import ClipScorer, ClipScorerConfig
from imageragturbo.model.pipeline import initial_noise, teacher_sample_latents, tokenize

from . import ladd
from .config import RecipeConfig  # noqa: F401 - the recipe's configuration
from .stages import StagedRun, mean_tail, save_atomic

STAGES = ("clip", "vae", "teacher", "synth", "student", "export")


# The per-batch steps, data helpers and EMA live in steps.py (imported here for the recipe and
# for callers that know them as base.*).
from .steps import (  # noqa: E402, F401
    EMA,
    OneStepStudent,
    augment,
    clip_step,
    ladd_step,
    teacher_step,
    to_unit,
    training_data,
    vae_step,
)

# ----------------------------------------------------------------------------- stages


class Recipe(StagedRun):
    """Runs the stages into ``run_dir``; every stage writes ``<stage>/done.json`` when it ends
    and is skipped on the next run."""

    STAGES = STAGES

    def __init__(self, run_dir: str | Path, cfg: RecipeConfig | None = None,
                 progress: bool = True, reconfigure: bool = False):
        super().__init__(run_dir, cfg or RecipeConfig(), progress, reconfigure)
        self._data = None
        # Context length 24, not SD's 77: with 77, ~65 padding states (never trained by the
        # contrastive loss) dilute every cross-attention; measured here, a teacher trained
        # that way ignored colour words after 1,500 steps (ShapesTIFA colour 0.16, chance).
        # The text encoder is causal, so its states at positions < 24 are unchanged.
        self.tokenizer = family.clip_tokenizer(self.cfg.context_length)
        self.scheduler = self._scheduler()

    @staticmethod
    def _scheduler():
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(**family.noise_schedule_config())

    @property
    def data(self):
        if self._data is None:
            if self.acc.is_main_process:
                training_data(self.cfg, self.dir / "data")  # renders and caches once
            self.acc.wait_for_everyone()
            self._data = training_data(self.cfg, self.dir / "data")
        return self._data

    def reuse_from(self, model: str | Path) -> dict:
        """Fill the clip and vae stages from an existing model folder (its ``text_encoder``,
        ``clip_scorer`` and ``vae``, stored fp32 in the run) instead of training them, so that
        new UNets (another layout, another schedule) can be trained on the same text encoder,
        retrieval keys, CLIP-score towers and latent space. A stage already done is left as it
        is. Returns what was reused."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        src = family.resolve(model)
        reused = {}
        if not self.done("clip"):
            d = self.dir / "clip"
            d.mkdir(exist_ok=True)
            CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=torch.float32,
                                          use_safetensors=True).save_pretrained(d / "text_encoder")
            ClipScorer.from_pretrained(src / "clip_scorer").float().save_pretrained(
                d / "clip_scorer")
            reused["clip"] = self._finish("clip", {"reused_from": str(src), "seconds": 0.0})
        if not self.done("vae"):
            vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32,
                                                use_safetensors=True)
            vae.save_pretrained(self.dir / "vae" / "model")
            reused["vae"] = self._finish("vae", {"reused_from": str(src), "seconds": 0.0,
                                                 "scaling_factor": vae.config.scaling_factor})
        return reused

    # -- 1. CLIP
    def stage_clip(self) -> dict:
        from transformers import CLIPTextModel

        cfg, d = self.cfg, self.dir / "clip"
        d.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)
        text = CLIPTextModel(family.tiny_text_config())
        scorer = ClipScorer(ClipScorerConfig(text_dim=text.config.hidden_size))
        opt = torch.optim.AdamW(list(text.parameters()) + list(scorer.parameters()),
                                lr=cfg.clip_lr, weight_decay=0.01)
        imgs, caps = self.data
        ids_all = tokenize(self.tokenizer, caps)
        state = {"text": text, "scorer": scorer, "opt": opt}
        text.to(self.acc.device), scorer.to(self.acc.device)
        backward = self._backward_fn(list(text.parameters()) + list(scorer.parameters()))

        def step(i):
            rng = self._rng("clip", i)
            idx = rng.choice(len(caps), cfg.clip_batch, replace=False)
            for g in opt.param_groups:
                g["lr"] = cfg.clip_lr * min(1.0, (i + 1) / 100)
            ids, x = self._dev(ids_all[idx], augment(to_unit(imgs[idx]), rng))
            return clip_step(text, scorer, opt, ids, x, backward)

        t0 = time.perf_counter()
        hist = self._loop("clip", state, step, cfg.clip_steps)
        if self.acc.is_main_process:
            text.cpu().save_pretrained(d / "text_encoder")
            scorer.cpu().save_pretrained(d / "clip_scorer")
        return self._finish("clip", {"final_loss": mean_tail(hist, "loss"),
                                     "first_loss": hist[0]["loss"] if hist else None,
                                     "seconds": time.perf_counter() - t0})

    def text_encoder(self, tuned: bool = True):
        """The teacher stage's fine-tuned text encoder once it exists (``teacher_text_lr`` > 0),
        else the clip stage's: what synth, student, export and the cached states use.
        ``tuned=False``: always the clip stage's (the teacher stage starts from it)."""
        from transformers import CLIPTextModel

        path = self.dir / "teacher" / "text_encoder"
        if not (tuned and path.is_dir()):
            path = self.dir / "clip" / "text_encoder"
        return CLIPTextModel.from_pretrained(path).eval()

    # -- 2. VAE
    def stage_vae(self) -> dict:
        from diffusers import AutoencoderKL

        cfg, d = self.cfg, self.dir / "vae"
        d.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(**family.tiny_vae_config())
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        imgs, _ = self.data
        c = cfg.vae_crop
        state = {"vae": vae, "opt": opt}
        vae.to(self.acc.device)
        backward = self._backward_fn(vae.parameters())

        def step(i):
            rng = self._rng("vae", i)
            idx = rng.choice(len(imgs), cfg.vae_batch, replace=False)
            oy, ox = rng.integers(0, imgs.shape[1] - c + 1, 2)
            for g in opt.param_groups:
                g["lr"] = cfg.vae_lr * min(1.0, (i + 1) / 100) * (
                    0.5 * (1 + math.cos(math.pi * i / cfg.vae_steps)))
            (x,) = self._dev(to_unit(imgs[idx, oy:oy + c, ox:ox + c]))
            return vae_step(vae, opt, x, backward=backward)

        t0 = time.perf_counter()
        hist = self._loop("vae", state, step, cfg.vae_steps)
        vae = vae.cpu().eval()
        with torch.no_grad():
            z = vae.encode(to_unit(imgs[:1024])).latent_dist.mode()
            rec = vae.decode(z).sample
            full_mse = float(((rec - to_unit(imgs[:1024])) ** 2).mean())
        # SD's convention: latents scaled to unit variance by config.scaling_factor
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        if self.acc.is_main_process:
            vae.save_pretrained(d / "model")
        return self._finish("vae", {"final_loss": mean_tail(hist, "loss"),
                                    "first_loss": hist[0]["loss"] if hist else None,
                                    "full_image_mse": full_mse,
                                    "scaling_factor": vae.config.scaling_factor,
                                    "seconds": time.perf_counter() - t0})

    def vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.dir / "vae" / "model").eval()

    @torch.no_grad()
    def _encode(self, text, captions: list[str], field: str) -> torch.Tensor:
        """``text``'s output ``field`` (last_hidden_state or pooler_output) for ``captions``,
        256 at a time."""
        return torch.cat([getattr(text(tokenize(self.tokenizer, captions[i:i + 256])), field)
                          for i in range(0, len(captions), 256)])

    def _text_states(self, text, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (N, L, D) fp16 of ``captions`` and of the empty prompt (1, L, D)."""
        return (self._encode(text, captions, "last_hidden_state").half(),
                self._encode(text, [""], "last_hidden_state"))

    @torch.no_grad()
    def _latents_and_text(self):
        """Scaled latents (N, 4, 16, 16) of the training renders and frozen text states,
        computed once by the main process and cached in the run. Once the teacher stage has
        fine-tuned the text encoder, the states are its (cached beside it)."""
        cache = self.dir / "data" / "latents.pt"
        tuned = self.dir / "teacher" / "text_encoder"
        if self.acc.is_main_process and not cache.exists():
            vae, text = self.vae(), self.text_encoder()
            imgs, caps = self.data
            lat = torch.cat([vae.encode(to_unit(imgs[i:i + 256])).latent_dist.mode()
                             * vae.config.scaling_factor for i in range(0, len(imgs), 256)])
            ehs, unc = self._text_states(text, caps)
            save_atomic({"latents": lat, "ehs": ehs, "uncond": unc}, cache)
        states = tuned.parent / "text_states.pt"
        if self.acc.is_main_process and tuned.is_dir() and not states.exists():
            ehs, unc = self._text_states(self.text_encoder(), self.data[1])
            save_atomic({"ehs": ehs, "uncond": unc}, states)
        self.acc.wait_for_everyone()
        data = torch.load(cache)
        if tuned.is_dir():
            data.update(torch.load(states))
        return data

    # -- 3. teacher
    def _new_unet(self):
        from diffusers import UNet2DConditionModel

        ucfg = family.tiny_unet_config(layout=self.cfg.unet_layout)
        ucfg["block_out_channels"] = tuple(self.cfg.teacher_channels)
        return UNet2DConditionModel(**ucfg)

    def stage_teacher(self) -> dict:
        """Epsilon-prediction teacher on the cached latents. With ``teacher_text_lr`` > 0 the
        text encoder trains with it (the diffusion loss shapes every token's state, which the
        contrastive clip stage leaves untrained but the EOS), while ``text_anchor`` x MSE holds
        the pooled output to the clip stage's, so the retrieval key and the CLIP-score
        analogue keep their meaning."""
        cfg, d = self.cfg, self.dir / "teacher"
        d.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)
        data = self._latents_and_text()
        lat, ehs_all, unc = data["latents"], data["ehs"], data["uncond"]
        unet = self._new_unet()
        ema = EMA(unet, cfg.ema)
        groups = [{"params": list(unet.parameters()), "lr": cfg.teacher_lr}]
        joint = cfg.teacher_text_lr > 0
        if joint:
            text = self.text_encoder(tuned=False)
            ids_all = tokenize(self.tokenizer, self.data[1])
            ids_unc = tokenize(self.tokenizer, [""])
            anchor = self._encode(text, self.data[1], "pooler_output")
            anchor_unc = self._encode(text, [""], "pooler_output")
            text.train().requires_grad_(True).to(self.acc.device)
            groups.append({"params": list(text.parameters()), "lr": cfg.teacher_text_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        base_lrs = [g["lr"] for g in opt.param_groups]
        ac = self.scheduler.alphas_cumprod
        state = {"unet": unet, "ema": ema.shadow, "opt": opt, **({"text": text} if joint else {})}
        unet.to(self.acc.device), ema.shadow.to(self.acc.device)
        backward = self._backward_fn([p for g in groups for p in g["params"]])

        def step(i):
            rng = self._rng("teacher", i)
            idx = rng.choice(len(lat), cfg.teacher_batch, replace=False)
            drop = torch.from_numpy(rng.random(len(idx)) < cfg.cfg_drop)
            anchor_loss = None
            if joint:
                ids = torch.where(drop.view(-1, 1), ids_unc.expand(len(idx), -1), ids_all[idx])
                out = text(*self._dev(ids))
                ehs = out.last_hidden_state
                target = torch.where(drop.view(-1, 1), anchor_unc, anchor[idx])
                anchor_loss = cfg.text_anchor * nn.functional.mse_loss(
                    out.pooler_output, *self._dev(target))
            else:
                ehs = ehs_all[idx].float()
                ehs = torch.where(drop.view(-1, 1, 1), unc.expand_as(ehs), ehs)
            t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
            noise = torch.from_numpy(rng.standard_normal(lat[idx].shape).astype(np.float32))
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * min(1.0, (i + 1) / 200) * (
                    0.55 + 0.45 * math.cos(math.pi * i / cfg.teacher_steps))
            z0, t, noise = self._dev(lat[idx], t, noise)
            out = teacher_step(unet, opt, z0, ehs.to(z0.device), t, noise, ac, backward,
                               cfg.teacher_min_snr, anchor_loss)
            ema.update(unet)
            return out

        t0 = time.perf_counter()
        hist = self._loop("teacher", state, step, cfg.teacher_steps)
        if self.acc.is_main_process:
            ema.shadow.cpu().save_pretrained(d / "unet_ema")
            if joint:  # saved last: its presence switches text_encoder() to it
                text.cpu().eval().save_pretrained(d / "text_encoder")
        info = {"final_loss": mean_tail(hist, "loss", 200),
                "first_loss": mean_tail(hist[:50], "loss"),
                "seconds": time.perf_counter() - t0}
        if joint:
            info["final_anchor"] = mean_tail(hist, "anchor", 200)
        return self._finish("teacher", info)

    def teacher(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(self.dir / "teacher" / "unet_ema").eval()

    # -- 4. synthetic data
    @torch.no_grad()
    def stage_synth(self) -> dict:
        d = self.dir / "synth"
        d.mkdir(exist_ok=True)
        data = self._latents_and_text()
        info = self._synthesise(data) if self.acc.is_main_process else {}
        return self._finish("synth", info)

    def _synthesise(self, data) -> dict:
        from tqdm import tqdm

        cfg, d = self.cfg, self.dir / "synth"
        unet = self.teacher().requires_grad_(False)
        comps = family.Components(tokenizer=self.tokenizer, text_encoder=None, vae=None,
                                  unet=unet, scheduler=self.scheduler)
        n = min(cfg.synth_prompts, len(data["ehs"]))
        idx = np.random.default_rng([cfg.seed, 4]).choice(len(data["ehs"]), n, replace=False)
        seeds = [10_000_000 + int(i) for i in idx]
        z_t = torch.from_numpy(initial_noise(seeds, tuple(data["latents"].shape[1:])))
        z0 = torch.empty_like(z_t)
        t0 = time.perf_counter()
        for a in tqdm(range(0, n, 200), desc="synth", disable=not self.progress):
            sl = slice(a, a + 200)
            z0[sl] = teacher_sample_latents(comps, unet, data["ehs"][idx[sl]].float(),
                                            data["uncond"], z_t[sl], cfg.synth_steps,
                                            cfg.guidance)
        torch.save({"idx": torch.from_numpy(idx), "z_t": z_t, "z0": z0}, d / "synth.pt")
        return {"prompts": n, "steps": cfg.synth_steps, "guidance": cfg.guidance,
                "seconds": time.perf_counter() - t0}

    # -- 5. student (LADD)
    def stage_student(self) -> dict:
        cfg, d = self.cfg, self.dir / "student"
        d.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)
        data = self._latents_and_text()
        syn = torch.load(self.dir / "synth" / "synth.pt")
        teacher = self.teacher().requires_grad_(False)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        text = self.text_encoder()
        _, caps = self.data
        pooled_all = self._encode(text, [caps[int(j)] for j in syn["idx"]], "pooler_output")
        disc = ladd.LADDDiscriminator(teacher, text_dim=pooled_all.shape[1])
        opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr, betas=(0.0, 0.99),
                                  weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.disc_lr,
                                  betas=(0.0, 0.99), weight_decay=0.0)
        ac = self.scheduler.alphas_cumprod
        n = len(syn["idx"])
        state = {"student": student, "heads": disc.heads, "opt_g": opt_g, "opt_d": opt_d}
        one_step = OneStepStudent(student, ac).to(self.acc.device)
        disc.to(self.acc.device)
        backward = self._backward_fn(student.parameters())

        def step(i):
            rng = self._rng("student", i)
            j = rng.choice(n, cfg.student_batch, replace=False)
            ehs = data["ehs"][syn["idx"][j]].float()
            s = torch.from_numpy(rng.integers(0, cfg.disc_s_max, len(j)))
            eps = torch.from_numpy(rng.standard_normal(syn["z0"][j].shape).astype(np.float32))
            z_t, z0, ehs, pooled, s, eps = self._dev(syn["z_t"][j], syn["z0"][j], ehs,
                                                     pooled_all[j], s, eps)
            return ladd_step(one_step, disc, opt_g, opt_d, z_t, z0, ehs, pooled, s, eps, ac,
                             cfg.distill_weight, backward=backward, sync_heads=self._sync_grads)

        t0 = time.perf_counter()
        hist = self._loop("student", state, step, cfg.student_steps)
        if self.acc.is_main_process:
            student.cpu().eval().save_pretrained(d / "unet")
        return self._finish("student", {
            "final_distill": mean_tail(hist, "distill"), "final_g_adv": mean_tail(hist, "g_adv"),
            "final_d": mean_tail(hist, "d"),
            "first_distill": mean_tail(hist[:20], "distill"),
            "seconds": time.perf_counter() - t0})

    # -- 6. export
    def stage_export(self) -> dict:
        from diffusers import UNet2DConditionModel

        d = self.dir / "export" / DEFAULT_MODEL
        if d.exists():
            shutil.rmtree(d)
        student = UNet2DConditionModel.from_pretrained(self.dir / "student" / "unet")
        comps = family.Components(tokenizer=self.tokenizer, text_encoder=self.text_encoder(),
                                  vae=self.vae(), unet=student, scheduler=self.scheduler)
        half = {"text_encoder", "vae", "unet"}
        for name in half:
            getattr(comps, name).half()
        family.save_sd_folder(comps, d)
        self.teacher().half().save_pretrained(d / "teacher_unet")
        shutil.copytree(self.dir / "clip" / "clip_scorer", d / "clip_scorer")
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        return self._finish("export", {"path": str(d), "bytes": size})
