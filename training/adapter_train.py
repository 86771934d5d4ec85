"""The train stage of ImageRAGTurbo fine-tuning (``training/adapter.py``'s ``AdapterRun``):
the LADD objective of paper Eq. 10 on batches streamed from the data and synth shards, each
target with its retrieved neighbours' H features (Eqs. 4-5; or, for the control, its own),
checkpointed with accelerate and logged per step (seconds, images/s, peak memory).

``TrainStage`` is a mixin: ``AdapterRun`` supplies the run folder, the configuration, the
components, the index and the stage bookkeeping (``stages.StagedRun``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from imageragturbo.defaults import STUDENT_TIMESTEP
from imageragturbo.model.h_space import HAdapter, adapter_config_for, count_parameters
from imageragturbo.model.lora import add_decoder_lora, lora_parameters, save_decoder_lora
from imageragturbo.model.neighbour_attention import FOLDER as NB_DIR
from imageragturbo.model.neighbour_attention import NeighbourAttention
from imageragturbo.model.pipeline import noised, sdedit_timestep
from imageragturbo.model.unet_split import UNetEncoder
from imageragturbo.runtime.request import initial_noise

from . import ladd
from .stages import AcceleratorCheckpoints, load_checkpoint, mean_tail
from .steps import OneStepStudent, ladd_step


class TrainStage:
    """``stage_train`` and its helpers, mixed into ``AdapterRun``."""

    def stage_train(self) -> dict:
        cfg, d = self.cfg, self.dir / "train"
        d.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)
        from imageragturbo.model.pipeline import latent_shape

        from . import shards as sh

        # Streams, not the data set: the real pairs from the data shards, the teacher's pairs
        # from the synth shards, each in a seeded shard order through a bounded shuffle buffer
        # (``shards.Stream``); this process's shards only under ``accelerate launch``.
        rank, world = self.acc.process_index, self.acc.num_processes
        data_root, syn_root = self._shards_dir("data"), self._shards_dir("synth")
        scene = ("scene_h",) if cfg.scene_neighbour > 0 else ()
        n_real = int(round(cfg.batch * cfg.real_fraction))
        real_stream = sh.Stream(data_root, ("latents", "ehs", "pooled", *scene), cfg.seed,
                                rank, world, cfg.shuffle_buffer, key=1,
                                rows=lambda s: int(s["real"])) if n_real else None
        plain_f = ("z0_plain",) if cfg.plain_fraction > 0 else ()
        syn_stream = sh.Stream(syn_root, ("item", "z0", "ehs", "pooled", *scene, *plain_f),
                               cfg.seed, rank, world, cfg.shuffle_buffer, key=2)
        first = sh.load(syn_root, int(syn_stream.shards[0]["index"]))
        text_len, text_dim = first["ehs"].shape[1], first["pooled"].shape[1]
        del first
        uncond = load_checkpoint(self.dir / "data" / "uncond.pt")["uncond"]
        shape = tuple(latent_shape(self.c))
        student = self.c.unet.train()
        if cfg.lora:
            add_decoder_lora(student, rank=cfg.lora_rank, targets=cfg.lora_targets)
        else:
            student.requires_grad_(False)
        if cfg.gradient_checkpointing:  # recompute the UNet blocks' activations in backward
            student.enable_gradient_checkpointing()
        acfg = adapter_config_for(student)
        acfg.positional = cfg.positional
        adapter = HAdapter(acfg).train()
        nb_attn = None
        if cfg.decoder_attention:
            nb_attn = NeighbourAttention.for_unet(student, text_len=text_len).train()
            nb_attn.attach(student)
        teacher = self.c.teacher_unet.requires_grad_(False)
        disc = ladd.LADDDiscriminator(teacher, text_dim=text_dim)
        perc = (ladd.LatentPerceptual(UNetEncoder(teacher), uncond)
                if cfg.perceptual_weight > 0 else None)
        groups = [{"params": list(adapter.parameters()), "lr": cfg.adapter_lr}]
        if cfg.lora:
            groups.append({"params": lora_parameters(student), "lr": cfg.lora_lr})
        if nb_attn is not None:
            groups.append({"params": list(nb_attn.parameters()), "lr": cfg.decoder_attention_lr})
        opt_g = torch.optim.AdamW(groups, betas=(0.0, 0.99), weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.disc_lr,
                                  betas=(0.0, 0.99), weight_decay=0.0)
        base_lrs = [g["lr"] for g in opt_g.param_groups]
        ac = self.c.alphas_cumprod
        if cfg.retrieval == "index":
            index = self.index
            # memory-mapped: (N, k) rows read as the batches need them
            nb = torch.load(self.dir / "neighbours" / "neighbours.pt", weights_only=True,
                            mmap=True)
            nb_ids, nb_scores = nb["ids"], nb["scores"]
            # each target's neighbours with its start neighbour first (start_slots; the top-1
            # unless start_pool > 1), the rest in rank order: the k a step draws are the first k
            slots = self.start_slots(nb_ids.shape[0])
            order = np.tile(np.arange(nb_ids.shape[1]), (len(slots), 1))
            for sl in range(1, cfg.start_pool):
                order[slots == sl] = [sl, *(j for j in range(nb_ids.shape[1]) if j != sl)]
        state = {"adapter": adapter, "student": student, "heads": disc.heads, "opt_g": opt_g,
                 "opt_d": opt_d, **({"neighbour_attention": nb_attn} if nb_attn is not None else {})}
        one_step = OneStepStudent(student, ac).to(self.acc.device)
        adapter.to(self.acc.device), disc.to(self.acc.device)
        if nb_attn is not None:
            nb_attn.to(self.acc.device)
        if perc is not None:
            perc.to(self.acc.device)
        backward = self._backward_fn([p for g in groups for p in g["params"]])
        t999 = torch.full((n_real,), STUDENT_TIMESTEP, dtype=torch.long)
        t_syn = None
        if cfg.neighbour_init:
            # the student starts where the teacher's SDEdit started: the top-1 neighbour's
            # latent noised with the target's z_T to the SDEdit timestep
            t_init = sdedit_timestep(self.c, cfg.synth_steps, cfg.neighbour_sdedit)
            t_syn = torch.cat([t999, torch.full((cfg.batch - n_real,), t_init,
                                                dtype=torch.long)]).to(self.acc.device)

        drawn = [0]  # steps whose items the streams have given

        def draw(i):
            """Step i's items; a resumed run first draws (and drops) the earlier steps' items,
            so that it continues with the very items an uninterrupted run would."""
            while drawn[0] <= i:
                reals = real_stream.draw(n_real) if n_real else []
                syns = syn_stream.draw(cfg.batch - n_real)
                drawn[0] += 1
            return reals, syns

        def stack(items, key, like=None):
            return torch.stack([x[key] for x in items]) if items else like

        def step(i):
            reals, syns = draw(i)
            rng = self._rng("train", i)
            tgt = np.array([x["row"] for x in reals] + [int(x["item"]) for x in syns],
                           np.int64)                                     # training item rows
            z0_real = stack(reals, "latents", torch.zeros(0, *shape)).float()
            eps_t = torch.from_numpy(rng.standard_normal(z0_real.shape).astype(np.float32))
            z_real = (ladd.add_noise(z0_real, eps_t, t999, ac) if cfg.real_input == "noised"
                      else eps_t)
            noise = torch.from_numpy(initial_noise([20_000_000 + int(r) for r in tgt[n_real:]],
                                                   shape))                  # each target's z_T
            syn_zt = noise
            if t_syn is not None:  # neighbour_init: from its start neighbour, noised to t_init
                rows = tgt[n_real:]
                first = index.latents(nb_ids[torch.from_numpy(rows),
                                             torch.from_numpy(slots[rows])].numpy())
                syn_zt = noised(self.c, torch.from_numpy(first.astype(np.float32)), syn_zt,
                                t_init)
            syn_z0 = stack(syns, "z0").float()
            t_step = t_syn
            off = None                  # plain_fraction: rows served with retrieval off
            if cfg.plain_fraction > 0:
                plain = torch.from_numpy(np.random.default_rng([cfg.seed, 11, i]).random(
                    len(syns)) < cfg.plain_fraction)
                syn_zt = torch.where(plain.view(-1, 1, 1, 1), noise, syn_zt)
                syn_z0 = torch.where(plain.view(-1, 1, 1, 1),
                                     stack(syns, "z0_plain").float(), syn_z0)
                off = torch.cat([torch.zeros(n_real, dtype=torch.bool), plain])
                t_step = torch.where(off.to(t_syn.device), STUDENT_TIMESTEP, t_syn)
                off = off.to(self.acc.device).view(-1, 1, 1, 1)
            z_t = torch.cat([z_real, syn_zt])
            z0 = torch.cat([z0_real, syn_z0])
            ehs = torch.cat([stack(reals, "ehs", torch.zeros(0, text_len, text_dim)).float(),
                             stack(syns, "ehs").float()])
            pooled = torch.cat([stack(reals, "pooled", torch.zeros(0, text_dim)).float(),
                                stack(syns, "pooled").float()])
            if cfg.text_drop > 0:  # the student's text only; the discriminator keeps pooled
                drop = torch.from_numpy(rng.random(cfg.batch) < cfg.text_drop).view(-1, 1, 1)
                ehs = torch.where(drop, uncond.expand_as(ehs), ehs)
            s = torch.from_numpy(rng.integers(0, cfg.disc_s_max, cfg.batch))
            eps_s = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
            gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
            for g, lr in zip(opt_g.param_groups, base_lrs):
                g["lr"] = lr * min(1.0, (i + 1) / 100)
            z_t, z0, ehs, pooled, s, eps_s = self._dev(z_t, z0, ehs, pooled, s, eps_s)
            if cfg.retrieval == "index":
                k = int(rng.integers(1, nb_ids.shape[1] + 1))
                t_, o = torch.from_numpy(tgt), torch.from_numpy(order[tgt])
                ids_k = torch.gather(nb_ids[t_], 1, o)[:, :k]
                h_retr = torch.from_numpy(index.h(ids_k.numpy()))          # (B, k, C, h, w)
                lam = (torch.gather(nb_scores[t_], 1, o)[:, 0].clone()
                       if cfg.lam == "similarity" else torch.ones(cfg.batch)).float()
                if cfg.scene_neighbour > 0:
                    # the augmentation: the target's own scene, jittered, in all k slots (k
                    # copies of one item attend exactly as one); its caption is the target's,
                    # so lambda (cosine of the two text keys) is 1
                    scene = np.concatenate([np.ones(n_real, bool), rng.random(
                        cfg.batch - n_real) < cfg.scene_neighbour])
                    sel = torch.from_numpy(scene)
                    own = torch.cat([stack(reals, "scene_h"), stack(syns, "scene_h")]
                                    ).float().unsqueeze(1).expand_as(h_retr)
                    h_retr = torch.where(sel.view(-1, 1, 1, 1, 1), own, h_retr.float())
                    lam = torch.where(sel, torch.ones_like(lam), lam)
                h_retr, lam = self._dev(h_retr.float(), lam)
                dec_ehs = None if nb_attn is None else nb_attn.decoder_context(ehs, h_retr)

                def h_edit(h):
                    out = adapter(h, h_retr, lam)
                    return out if off is None else torch.where(off, h, out)
            else:
                dec_ehs = None

                def h_edit(h):  # the control: the target's own feature, nothing retrieved
                    return adapter(h, h.unsqueeze(1), torch.ones_like(h[:, 0, 0, 0]))

            def perceptual(a, b):
                return perc(a, b, gen)

            if cfg.validation_every and (i + 1) % cfg.validation_every == 0:
                validate(i + 1)
            with self._autocast():
                return ladd_step(one_step, disc, opt_g, opt_d, z_t, z0, ehs, pooled, s, eps_s,
                                 ac, cfg.distill_weight, h_edit=h_edit, backward=backward,
                                 sync_heads=self._sync_grads,
                                 perceptual=perceptual if perc is not None else None,
                                 perceptual_weight=cfg.perceptual_weight,
                                 adv_weight=cfg.adv_weight, decoder_ehs=dec_ehs, t=t_step)

        val = sh.load(syn_root, int(syn_stream.shards[0]["index"]))
        val_rows = val["item"][:4].numpy()
        val_ehs = val["ehs"][:4].float()
        del val

        @torch.no_grad()
        def validate(at: int) -> None:
            """A PNG grid, ``train/validation/step-NNNNNN.png``, before step ``at``'s update:
            the first synth shard's first prompts, one column each, from fixed z_T; top row
            with retrieval (their neighbours, all k_max; the control: its own h; with
            ``neighbour_init``, from the start neighbour noised with z_T to t_init, as served),
            bottom row without (the student with its LoRA, no adapter, from z_T at t = 999).
            No training randomness is used."""
            if not self.acc.is_main_process:
                return
            from PIL import Image

            from imageragturbo.model.pipeline import decode_latents

            z = torch.from_numpy(initial_noise([20_000_000 + int(r) for r in val_rows], shape))
            z_on, t_on = z, None
            if t_syn is not None:   # served as a neighbour start: the one the train step uses
                start = index.latents(nb_ids[torch.from_numpy(val_rows),
                                             torch.from_numpy(slots[val_rows])].numpy())
                z_on = noised(self.c, torch.from_numpy(start.astype(np.float32)), z, t_init)
                t_on = torch.full((len(z),), t_init, dtype=torch.long)
            z, z_on, e = self._dev(z, z_on, val_ehs)
            if t_on is not None:
                t_on = t_on.to(z.device)
            if cfg.retrieval == "index":
                t_ = torch.from_numpy(val_rows)
                hr = torch.from_numpy(index.h(nb_ids[t_].numpy())).float()
                lm = (nb_scores[t_, 0].clone() if cfg.lam == "similarity"
                      else torch.ones(len(t_))).float()
                hr, lm = self._dev(hr, lm)
                dec = None if nb_attn is None else nb_attn.decoder_context(e, hr)

                def edit(h):
                    return adapter(h, hr, lm)
            else:
                dec = None

                def edit(h):
                    return adapter(h, h.unsqueeze(1), torch.ones_like(h[:, 0, 0, 0]))

            with self._autocast():
                rows = [one_step(z_on, e, edit, dec, t_on), one_step(z, e, None)]
            imgs = [decode_latents(self.c, r.float().cpu()) for r in rows]   # (B, H, W, 3)
            grid = np.concatenate([np.concatenate(list(x), axis=1) for x in imgs], axis=0)
            out = d / "validation"
            out.mkdir(exist_ok=True)
            Image.fromarray(grid).save(out / f"step-{at:06d}.png")

        t0 = time.perf_counter()
        hist = self._loop("train", state, self._timed(step, d / "log.jsonl"), cfg.steps,
                          AcceleratorCheckpoints(self.acc, d / "checkpoints",
                                                 cfg.checkpoints_total_limit, d / "ckpt.pt"))
        if self.acc.is_main_process:
            # fp16 on disk, like the rest of the shipped model (loaded back as fp32)
            adapter.cpu().eval().save_pretrained(d / "h_adapter", dtype=torch.float16)
            if cfg.lora:
                save_decoder_lora(student.cpu(), d / "unet_lora", dtype=torch.float16)
            if nb_attn is not None:
                nb_attn.cpu().eval().save_pretrained(d / NB_DIR, dtype=torch.float16)
        info = {"steps": cfg.steps, "seconds": time.perf_counter() - t0,
                "adapter_parameters": count_parameters(adapter),
                "lora_parameters": sum(p.numel() for p in lora_parameters(student)),
                **({"decoder_attention_parameters": count_parameters(nb_attn)}
                   if nb_attn is not None else {}),
                **({"neighbour_init_timestep": int(t_syn[-1])} if t_syn is not None else {}),
                "retrieval": cfg.retrieval, "device": str(self.acc.device),
                "processes": self.acc.num_processes, "mixed_precision": cfg.mixed_precision,
                "gradient_checkpointing": cfg.gradient_checkpointing,
                **self._throughput(d / "log.jsonl")}
        for key in ("distill", "lpips", "g_adv", "d"):
            if any(key in h for h in hist):  # lpips, g_adv and d only when their term is on
                info[f"first_{key}"] = mean_tail(hist[:50], key)
                info[f"final_{key}"] = mean_tail(hist, key, 200)
        (d / "history.json").write_text(json.dumps(hist) + "\n")
        return self._finish("train", info)

    def _autocast(self):
        """The forward passes in ``mixed_precision`` (bf16 or fp16 autocast on the run's
        device; the weights and optimiser states stay fp32); a no-op for "no"."""
        import contextlib

        mp = self.cfg.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        if mp == "fp16" and self.acc.device.type != "cuda":
            raise ValueError("mixed_precision fp16 needs a CUDA device; use bf16 on the CPU")
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(self.acc.device.type, dtype=dtype)

    def _timed(self, step, log: Path):
        """``step`` that also appends one JSON line per step to ``log``: its seconds, steps/s,
        images/s (over all processes) and the peak memory so far (CUDA: max allocated;
        CPU: the process's peak RSS)."""
        import resource

        batch = self.cfg.batch * self.acc.num_processes

        def timed(i):
            t = time.perf_counter()
            out = step(i)
            dt = time.perf_counter() - t
            if self.acc.device.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(self.acc.device))
            else:
                peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            if self.acc.is_main_process:
                with open(log, "a") as f:
                    f.write(json.dumps({"step": i, "seconds": dt, "steps_per_s": 1 / dt,
                                        "images_per_s": batch / dt,
                                        "peak_memory_bytes": peak}) + "\n")
            return out

        return timed

    @staticmethod
    def _throughput(log: Path) -> dict:
        """Mean steps/s and images/s over the logged steps (the first, warm-up, left out
        when there are more) and the peak memory."""
        if not log.exists():
            return {}
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        use = rows[1:] if len(rows) > 1 else rows
        secs = sum(r["seconds"] for r in use)
        return {"steps_per_s": len(use) / secs if secs else None,
                "images_per_s": sum(r["images_per_s"] * r["seconds"] for r in use) / secs
                if secs else None,
                "peak_memory_bytes": max((r["peak_memory_bytes"] for r in rows), default=None)}
