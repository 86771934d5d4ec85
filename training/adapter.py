"""ImageRAGTurbo fine-tuning (paper Secs. 3.3-3.4): the one-step student learns to use
retrieval through an H-space adapter and LoRA on its UNet decoder.

Trainable: the H-adapter g_phi (Eqs. 4-5; zero-initialised output, so training starts from
the student exactly; lambda = cosine similarity of the target's and the top retrieved item's
text embeddings, Eq. 5) and LoRA (peft) on the decoder's attention projections. Frozen: the
student's encoder (so the retrieved items' H features cached in the index stay valid), the
text encoder, the VAE and the teacher, whose encoder is the discriminator's backbone (Fig. 4)
and the latent perceptual network F of Eq. 9.

Objective, Eq. 10: L = L_adv (hinge, Eqs. 6-7, spectrally normalised heads) + alpha L_distill
(smooth L1, Eq. 8) + beta L_latentLPIPS (Eq. 9; ``ladd.LatentPerceptual``).

Data (paper Sec. 4.1: real and synthetic pairs): real pairs (their VAE latents are z_0; the
student sees them noised to t = 999) and the teacher's samples for prompts (z_T -> z_0 with
DDIM and CFG). The real pairs are ShapesWorld's training renders (the shipped recipe) or a
user's pairs (``training/sources.py``: JSONL, Parquet, WebDataset shards; images of any size,
bad ones skipped and reported); the prompts are the real pairs' captions or a prompts file.
Retrieval: each target's k neighbours come from the retrieval index (ShapesWorld's retrieval
split, or the user's own pairs, encoded by this model: h = f_enc at t = 0, cached at build
time, paper Sec. 3.2), found by the target's pooled text key. The training and retrieval sets
are checked disjoint (by id and by the images' content hash) and the evaluation split is only
evaluated, so a gain on combinations absent from training can come only through retrieval.

Stages (``imageragturbo train adapter``), each resumable and skipped once done:
``data`` (renders -> latents and text states), ``synth`` (teacher pairs), ``neighbours`` (k
neighbours of every target, with the checks that no target retrieves itself; in
``training/adapter_neighbours.py``), ``train`` (in ``training/adapter_train.py``), ``export``
(``h_adapter/`` and ``unet_lora/``, which ``--install`` copies into the model).

``retrieval="none"`` is the control: the same adapter, LoRA, data, losses and steps, with the
target's own H feature in place of the retrieved ones (lambda = 1), so whatever it gains comes
from more fine-tuning, not from retrieval.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL
from imageragturbo.model import family
from imageragturbo.model.neighbour_attention import FOLDER as NB_DIR
from imageragturbo.model.pipeline import teacher_sample_latents, tokenize
from imageragturbo.model.unet_split import UNetEncoder
from imageragturbo.runtime.request import initial_noise

from .adapter_neighbours import NeighbourStage
from .adapter_train import TrainStage
from .config import AdapterConfig  # noqa: F401 - the recipe's configuration
from .stages import StagedRun, load_checkpoint, save_atomic
from .steps import to_unit

STAGES = ("data", "neighbours", "synth", "train", "export")  # synth may start from neighbours


class AdapterRun(NeighbourStage, TrainStage, StagedRun):
    """ImageRAGTurbo fine-tuning of ``cfg.model`` into ``run_dir``, retrieving from the index
    at ``index`` (for ShapesWorld, built over ``data``'s retrieval split with the model's
    encoder when missing: ``retriever.ensure.ensure_index``; for a user's pairs or prompts, an
    index the user built with ``imageragturbo index build --pairs``). The teacher is
    ``cfg.teacher``'s ``unet/`` or the student folder's ``teacher_unet/``."""

    STAGES = STAGES
    config_file = "adapter.json"

    def __init__(self, run_dir: str | Path, cfg: AdapterConfig | None = None,
                 index: str | Path | None = None, data: str | Path = DATA_ROOT,
                 progress: bool = True, reconfigure: bool = False):
        super().__init__(run_dir, cfg or AdapterConfig(), progress, reconfigure)
        self.model_dir = family.resolve(self.cfg.model)
        self.index_dir = Path(index) if index else None
        self.data_dir = Path(data)
        if not self.cfg.shapesworld and self.cfg.retrieval == "index" and index is None:
            raise ValueError("training on your own pairs or prompts retrieves from an index of "
                             "other pairs, built with this student: `imageragturbo index build "
                             f"--pairs FILE --model {self.cfg.model} --out DIR`, then --index DIR")
        own = self.cfg.teacher is None
        if own and not (self.model_dir / "teacher_unet").is_dir():
            raise ValueError(f"{self.model_dir} has no teacher_unet/: the discriminator and the "
                             "synthetic pairs need the teacher; give --teacher DIR, a diffusers "
                             "folder whose unet/ is the teacher (e.g. SD 2.1-base for SD-Turbo)")
        self.c = family.load_components(self.model_dir, with_teacher=own, retrieval_tuned=False)
        if not own:
            self.c.teacher_unet = family.load_teacher_unet(self.cfg.teacher, self.c)
        self._index = None
        self._cache = None
        self._items = None
        self._adopt_data_counts()

    def _adopt_data_counts(self) -> None:
        """The train stage draws real rows from ``range(cfg.n_train)``: for a user's pairs
        that is the number of pairs the data stage kept (bad images skipped), so the run's
        configuration takes it once the data stage is done. ShapesWorld keeps ``n_train``."""
        import dataclasses

        done = self.done("data")
        if not self.cfg.shapesworld and done is not None:
            self.cfg = dataclasses.replace(self.cfg, n_train=int(done["real_items"]))

    def _say(self, msg: str) -> None:
        if self.progress and self.acc.is_main_process:
            print(f"train adapter: {msg}", file=sys.stderr, flush=True)

    # -- 1. data: real pairs, text states and keys
    def _item_bytes(self) -> int:
        """About how many bytes one item takes in a data shard: its fp16 latent and text
        states, fp32 pooled key (and fp16 scene feature with ``scene_neighbour``)."""
        from imageragturbo.model.pipeline import latent_shape

        d = int(self.c.text_encoder.config.hidden_size)
        n = 2 * int(np.prod(latent_shape(self.c))) + 2 * int(self.c.tokenizer.model_max_length) \
            * d + 4 * d
        if self.cfg.scene_neighbour > 0:
            n += 2 * int(np.prod(self.h_shape()))
        return n

    def _shards_dir(self, stage: str) -> Path:
        """``<stage>/shards``, refusing a run folder whose stage predates streamed caches."""
        root = self.dir / stage / "shards"
        if self.done(stage) is not None and not (root / "manifest.json").exists():
            old = {"data": "data/cache.pt", "synth": "synth/synth.pt"}[stage]
            raise FileNotFoundError(
                f"{self.dir} was made by an older version ({old}, held in memory, instead of "
                f"streamed shards in {stage}/shards): remove {self.dir / 'data'}, "
                f"{self.dir / 'neighbours'}, {self.dir / 'synth'} and {self.dir / 'train'} "
                "and rerun; the data stage then writes the shards")
        return root

    @torch.no_grad()
    def stage_data(self) -> dict:
        """Real pairs -> VAE latents, every caption and prompt -> text states and pooled keys,
        written as shards (``data/shards``, ``training/shards.py``: about ``shard_mb`` MiB
        each, with a manifest of counts and sha256) so that neither this stage nor training
        holds the data set in memory; a stage killed midway resumes at the first incomplete
        shard. Under ``accelerate launch`` shard i is encoded by process i mod N. The slots
        are the listed pairs (or ShapesWorld's items), then the prompts; a shard keeps its
        usable pairs first (``latents`` has a row for each), then its prompts. One row per
        kept item in ``data/items.jsonl``. A user's pairs are read by
        ``training/sources.py``: bad images are skipped and listed in ``data/report.json``.
        With retrieval, the index is checked (model, disjointness) before any image is read,
        and again by content once the images are hashed."""
        import hashlib

        from imageragturbo.images import BadImage

        from . import shards as sh
        from . import sources

        cfg, d, c, dev = self.cfg, self.dir / "data", self.c, self.acc.device
        d.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        info: dict = {}
        listed_bad: list[dict] = []
        if cfg.shapesworld:
            from imageragturbo import shapesworld as sw

            items = sw.make_split("train", cfg.n_train, cfg.seed)
            if cfg.retrieval == "index":
                info.update(self._check_index([{"id": it.id, "caption": it.caption,
                                                "image": None, "sha256": None, "kind": "pair"}
                                               for it in items]))
        elif cfg.pairs:
            items, listed_bad = sources.list_pairs(cfg.pairs)
            if not items and not listed_bad:
                raise ValueError(f"no pairs in {', '.join(cfg.pairs)}")
            if cfg.retrieval == "index":            # ids: before any image is read
                self._check_index([{"id": it.id, "kind": "pair"} for it in items],
                                  content=False)
        else:  # prompts only: no real pairs, the teacher's samples are every target
            items = []
            if cfg.retrieval == "index":
                _ = self.index                      # another model's index is refused here
        prompts = sources.read_prompts(cfg.prompts) if cfg.prompts else []
        listed = len(items) + len(listed_bad)
        size = int(c.vae.config.sample_size)        # the student's resolution (latent_shape's)
        min_side = cfg.min_image_side or size // 2
        limit = cfg.max_bad_share * listed
        per = sh.items_per_shard(cfg.shard_mb, self._item_bytes())
        cuts = sh.cut(len(items) + len(prompts), per)
        fp = hashlib.sha256(json.dumps([cfg.model, cfg.teacher, cfg.seed, cfg.scene_neighbour,
                                        size, min_side]).encode())
        for it in items:
            fp.update(f"{it.id}\0{it.caption}\n".encode())
        for p in prompts:
            fp.update(f"{p}\n".encode())
        root = d / "shards"
        sh.prepare(root, {"fingerprint": fp.hexdigest(), "shard_items": per,
                          "shards": len(cuts)}, self.acc.is_main_process)
        self.acc.wait_for_everyone()
        vae, text = c.vae.to(dev), c.text_encoder.to(dev)
        unc = text(tokenize(c.tokenizer, [""]).to(dev)).last_hidden_state.cpu()

        def encode(imgs: np.ndarray) -> torch.Tensor:   # uint8 (B, H, W, 3) -> (B, C, h, w)
            out = []
            for a in range(0, len(imgs), 256):
                z = vae.encode(to_unit(imgs[a:a + 256]).to(dev)).latent_dist.mode()
                out.append((z * vae.config.scaling_factor).cpu())
            return torch.cat(out)

        from imageragturbo.model.pipeline import latent_shape

        bad_seen = len(listed_bad)                  # this process's running count
        stopped = None
        mine = sh.mine(len(cuts), self.acc.process_index, self.acc.num_processes)
        from tqdm import tqdm

        for i in tqdm(mine, desc="data: shards", disable=not self.progress):
            meta = sh.done(root, i)
            if meta is not None:
                bad_seen += len(meta["bad"])
                continue
            a, b = cuts[i]
            rows, imgs, bad, seen = [], [], [], 0
            if cfg.shapesworld:
                for it in items[a:min(b, len(items))]:
                    rows.append({"id": it.id, "caption": it.caption, "image": None,
                                 "sha256": None, "kind": "pair"})
                    imgs.append(np.asarray(sw.render(it.scene, size)))
            elif items and a < len(items) and bad_seen <= limit:
                for it, img, digest in sources.load_images(items[a:min(b, len(items))],
                                                           size, min_side):
                    seen += 1
                    if isinstance(img, BadImage):
                        bad.append(sources.bad_entry(it, img))
                        if bad_seen + len(bad) > limit:
                            break
                        continue
                    rows.append({"id": it.id, "caption": it.caption, "image": it.where,
                                 "sha256": digest, "kind": "pair"})
                    imgs.append(img)
            if bad_seen + len(bad) > limit:         # stop: the report, then the error
                stopped = {"bad": bad, "read": seen}
                break
            n_real = len(rows)
            rows += [{"id": f"prompt:{n}", "caption": prompts[n], "image": None,
                      "sha256": None, "kind": "prompt"}
                     for n in range(max(a, len(items)) - len(items), b - len(items))]
            lat = encode(np.stack(imgs)) if imgs else torch.zeros(0, *latent_shape(c))
            caps = [r["caption"] for r in rows]
            ehs, pooled = [torch.zeros(0, *unc.shape[1:], dtype=torch.float16)], \
                [torch.zeros(0, int(c.text_encoder.config.hidden_size))]
            for s in range(0, len(caps), 256):
                out = text(tokenize(c.tokenizer, caps[s:s + 256]).to(dev))
                ehs.append(out.last_hidden_state.half().cpu())
                pooled.append(out.pooler_output.float().cpu())
            tensors = {"latents": lat.half(), "ehs": torch.cat(ehs), "pooled": torch.cat(pooled)}
            if cfg.scene_neighbour > 0:
                tensors["scene_h"] = self._scene_features(items[a:a + n_real], tensors["ehs"],
                                                          i)
            bad_seen += len(bad)
            sh.write(root, i, tensors, {"items": len(rows), "real": n_real,
                                        "read": n_real + len(bad), "rows": rows, "bad": bad})
        if stopped is not None:
            (d / f"stopped-{self.acc.process_index}.json").write_text(json.dumps(stopped))
        vae.cpu(), text.cpu()
        self.acc.wait_for_everyone()
        stops = sorted(d.glob("stopped-*.json"))
        if not self.acc.is_main_process:
            if stops:
                raise ValueError(f"data: more than max_bad_share of the images are bad; see "
                                 f"{d / 'report.json'}")
        else:
            info = self._finish_data(root, cuts, listed, listed_bad, prompts, stops, size,
                                     min_side, info, unc, t0)
        out = self._finish("data", info)
        self.acc.wait_for_everyone()
        self._adopt_data_counts()
        return out

    def _finish_data(self, root, cuts, listed, listed_bad, prompts, stops, size, min_side,
                     info, unc, t0) -> dict:
        """The main process, once every process has written its shards: the report and the
        bad-share stop, items.jsonl, the content check against the index, the manifest."""
        from . import shards as sh

        cfg, d = self.cfg, self.dir / "data"
        rows_n, n_real, bad, read = 0, 0, list(listed_bad), 0
        complete = [i for i in range(len(cuts)) if sh.done(root, i) is not None]
        with open(d / "items.jsonl.tmp", "w") as f:
            for meta in sh.sidecars(root, len(cuts)) if len(complete) == len(cuts) else []:
                f.writelines(json.dumps(r) + "\n" for r in meta["rows"])
                rows_n += int(meta["items"])
                n_real += int(meta["real"])
        for i in complete:
            meta = json.loads((root / f"shard-{i:05d}.json").read_text())
            bad += meta["bad"]
            read += int(meta["read"])
        for p in stops:
            s = json.loads(p.read_text())
            bad += s["bad"]
            read += int(s["read"])
            p.unlink()
        if not cfg.shapesworld and cfg.pairs:
            stopped = len(bad) > cfg.max_bad_share * listed
            reasons: dict[str, int] = {}
            for b in bad:
                reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
            report = {"pairs": list(cfg.pairs), "listed": listed, "read": read,
                      "kept": n_real, "bad": len(bad), "bad_share": len(bad) / listed,
                      "max_bad_share": cfg.max_bad_share, "stopped": stopped,
                      "resolution": size, "min_image_side": min_side, "by_reason": reasons,
                      "bad_items": bad}
            path = d / "report.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            if stopped:
                some = "at least " if read < listed - len(listed_bad) else ""
                raise ValueError(f"data: {some}{len(bad)} of {listed} pairs are bad "
                                 f"({why}: {len(bad) / listed:.1%}), more than max_bad_share "
                                 f"{cfg.max_bad_share:.1%} (--max-bad-share); stopped before "
                                 f"training. The list, with paths and reasons: {path}")
            print(f"train adapter: data: {n_real} of {listed} pairs kept, {len(bad)} "
                  f"skipped{f' ({why})' if bad else ''}; report: {path}",
                  file=sys.stderr, flush=True)
            need = int(round(cfg.batch * cfg.real_fraction))
            if n_real < need:
                raise ValueError(f"data: {n_real} usable pairs, fewer than the {need} real "
                                 "pairs each batch draws (batch x real_fraction)")
            info = {**info, "pairs_listed": listed, "bad_images": len(bad),
                    "report": str(path)}
        if len(complete) < len(cuts):
            raise RuntimeError(f"data: shards {sorted(set(range(len(cuts))) - set(complete))} "
                               "were not written (a process failed?); rerun to resume")
        (d / "items.jsonl.tmp").replace(d / "items.jsonl")
        self._items = None
        if cfg.retrieval == "index" and not cfg.shapesworld and cfg.pairs:
            info.update(self._check_index(self.items))   # content: the hashes, now known
        save_atomic({"uncond": unc.float()}, d / "uncond.pt")
        m = sh.finalize(root, len(cuts), {"real_items": n_real, "prompts": len(prompts)})
        return {"source": "shapesworld" if cfg.shapesworld else "pairs",
                "items": rows_n, "real_items": n_real, "prompts": len(prompts),
                "shards": len(m["shards"]), "shard_items": m["shards"][0]["items"] if
                m["shards"] else 0, "shards_bytes": sum(s["bytes"] for s in m["shards"]),
                **info, "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def _scene_features(self, items, ehs: torch.Tensor, shard: int) -> torch.Tensor:
        """The augmentation neighbour of ShapesWorld training ``items`` (``scene_neighbour``):
        each scene re-rendered with a small jitter (``sw.jitter``, seeded per shard), encoded
        as the index encodes its items, h = f_enc(tau(caption), t=0, VAE latent) (paper Sec.
        3.2). (N, C, h, w) fp16. These are never index items: they stand in for a neighbour
        that shows what the caption does not pin down (layout, size, exact hue), which no
        retrieved item is guaranteed to."""
        from imageragturbo import shapesworld as sw

        c, dev = self.c, self.acc.device
        rng = np.random.default_rng([self.cfg.seed, 77, shard])
        imgs = np.stack([np.asarray(sw.render(sw.jitter(it.scene, rng), c.vae.config.sample_size))
                         for it in items])
        enc = UNetEncoder(c.unet).to(dev)
        out = []
        for i in range(0, len(imgs), 256):
            z = c.vae.encode(to_unit(imgs[i:i + 256]).to(dev)).latent_dist.mode()
            z = z * c.vae.config.scaling_factor
            t = torch.zeros(len(z), dtype=torch.long, device=dev)
            out.append(enc(z, t, ehs[i:i + 256].float().to(dev))[0].half().cpu())
        enc.cpu()  # the UNet back where the other stages expect it
        return torch.cat(out)

    @property
    def cache(self) -> dict:
        """Every data shard at once (``latents`` of the real pairs, ``ehs``, ``pooled``,
        ``uncond``, ``scene_h``): for small runs, tests and inspection; training streams."""
        if self._cache is None:
            from . import shards as sh

            root = self._shards_dir("data")
            self._cache = {**sh.read_all(root, ("latents", "ehs", "pooled", "scene_h")),
                           **load_checkpoint(self.dir / "data" / "uncond.pt")}
        return self._cache

    @property
    def items(self) -> list[dict]:
        """One row per data row (``data/items.jsonl``): id, caption, image, sha256, kind
        ("pair" or "prompt")."""
        if self._items is None:
            path = self.dir / "data" / "items.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path} missing: run the data stage first")
            self._items = [json.loads(line) for line in path.read_text().splitlines()]
        return self._items

    # -- 2. synthetic pairs from the teacher
    @torch.no_grad()
    def stage_synth(self) -> dict:
        """The teacher's samples for ``synth_prompts`` training prompts from seeded z_T
        (``initial_noise`` of 20,000,000 + the prompt's row, so z_T need not be stored),
        written as shards aligned with the data shards (``synth/shards``: synth shard i holds
        the drawn rows of data shard i, with their z0, text states and keys, so training
        streams them without the data shards); a rerun resumes at the first incomplete shard,
        and under ``accelerate launch`` shard i is sampled by process i mod N."""
        from tqdm import tqdm

        from imageragturbo.model.pipeline import latent_shape

        from . import shards as sh

        cfg, d = self.cfg, self.dir / "synth"
        d.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        src = self._shards_dir("data")
        m = sh.manifest(src)
        n_items, n_real = int(m["items"]), int(m["real_items"])
        # the prompts file's rows when there is one (after the real pairs), else every row
        pool = np.arange(n_real if m["prompts"] else 0, n_items, dtype=np.int64)
        n = min(cfg.synth_prompts, len(pool))
        need = cfg.batch - int(round(cfg.batch * cfg.real_fraction))
        if n < need:
            raise ValueError(f"synth: {n} prompts for the teacher, fewer than the {need} "
                             "synthetic pairs each batch draws: give more prompts (or "
                             "--synth-prompts), or a smaller --batch")
        idx = pool[np.random.default_rng([cfg.seed, 2]).choice(len(pool), n, replace=False)]
        root = d / "shards"
        plan = {"data": [s["sha256"] for s in m["shards"]], "n": n,
                "steps": cfg.synth_steps, "guidance": cfg.guidance,
                "sdedit": cfg.neighbour_sdedit}
        if cfg.plain_fraction > 0:  # only when on: earlier runs' plans stay valid
            plan["plain"] = True
        if cfg.start_pool > 1:
            plan["start_pool"] = cfg.start_pool
        sh.prepare(root, plan, self.acc.is_main_process)
        self.acc.wait_for_everyone()
        dev = self.acc.device
        uncond = load_checkpoint(self.dir / "data" / "uncond.pt")["uncond"].to(dev)
        shape = tuple(latent_shape(self.c))
        teacher = self.c.teacher_unet.to(dev)
        todo = [i for i in sh.mine(len(m["shards"]), self.acc.process_index,
                                   self.acc.num_processes) if sh.done(root, i) is None]
        for i in tqdm(todo, desc="synth: shards", disable=not self.progress):
            s = m["shards"][i]
            first, count = int(s["first"]), int(s["items"])
            rows = idx[(idx >= first) & (idx < first + count)]       # in the drawn order
            t = sh.load(src, i) if len(rows) else None
            local = torch.from_numpy(rows - first)
            z0 = torch.zeros(len(rows), *shape)
            z_init = self._start_latents(rows) if cfg.neighbour_sdedit > 0 and len(rows) \
                else None
            plain = torch.zeros(len(rows), *shape) if cfg.plain_fraction > 0 else None
            for a in range(0, len(rows), 200):
                sl = slice(a, a + 200)
                z_t = torch.from_numpy(initial_noise([20_000_000 + int(r) for r in rows[sl]],
                                                     shape)).to(dev)
                ehs = t["ehs"][local[sl]].float().to(dev)
                z0[sl] = teacher_sample_latents(
                    self.c, teacher, ehs, uncond, z_t, cfg.synth_steps, cfg.guidance,
                    z_init=None if z_init is None else z_init[sl].to(dev),
                    strength=cfg.neighbour_sdedit or 1.0).cpu()
                if plain is not None:  # the same prompt and z_T, from noise (plain_fraction)
                    plain[sl] = teacher_sample_latents(self.c, teacher, ehs, uncond, z_t,
                                                       cfg.synth_steps, cfg.guidance).cpu()
            out = {"item": torch.from_numpy(rows), "z0": z0,
                   **({"z0_plain": plain} if plain is not None else {})}
            for f in ("ehs", "pooled", "scene_h"):
                if t is not None and f in t:
                    out[f] = t[f][local]
            sh.write(root, i, out, {"items": len(rows)})
        teacher.cpu()
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            sh.finalize(root, len(m["shards"]), {"prompts": n})
        return self._finish("synth", {"prompts": n,
                                      "steps": cfg.synth_steps, "guidance": cfg.guidance,
                                      "neighbour_sdedit": cfg.neighbour_sdedit,
                                      "seconds": time.perf_counter() - t0})

    def start_slots(self, n_items: int) -> np.ndarray:
        """Which of its cached neighbours each of ``n_items`` training items starts from
        (``neighbour_sdedit``): slot 0, the top-1, or with ``start_pool`` P > 1 one of the top
        P drawn by the run's seed, the same in synth (the teacher's start) and train (the
        student's start and the first neighbour it attends to)."""
        if self.cfg.start_pool == 1:
            return np.zeros(n_items, np.int64)
        return np.random.default_rng([self.cfg.seed, 5]).integers(
            0, self.cfg.start_pool, n_items).astype(np.int64)

    def _start_latents(self, rows: np.ndarray) -> torch.Tensor:
        """The VAE latents of the start neighbour (``start_slots``) of training items ``rows``
        (the SDEdit starts of ``neighbour_sdedit``): the neighbours stage must have run."""
        path = self.dir / "neighbours" / "neighbours.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: neighbour_sdedit starts the teacher from "
                                    "a neighbour of each target; run the neighbours stage "
                                    "before synth")
        ids = load_checkpoint(path)["ids"].numpy()
        slots = self.start_slots(len(ids))
        return torch.from_numpy(self.index.latents(ids[rows, slots[rows]]).astype(np.float32))

    # -- 5. export
    def stage_export(self) -> dict:
        """``export/h_adapter`` and ``export/unet_lora`` (fp16 safetensors + config), and
        ``export/adapter_training.json`` (the configuration and what each stage measured)."""
        d = self.dir / "export"
        if self.acc.is_main_process:
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            shutil.copytree(self.dir / "train" / "h_adapter", d / "h_adapter")
            if (self.dir / "train" / "unet_lora").is_dir():
                shutil.copytree(self.dir / "train" / "unet_lora", d / family.LORA_DIR)
            if (self.dir / "train" / NB_DIR).is_dir():
                shutil.copytree(self.dir / "train" / NB_DIR, d / NB_DIR)
            record = {"config": json.loads((self.dir / self.config_file).read_text()),
                      **{st: self.done(st) for st in STAGES[:-1]}}
            (d / "adapter_training.json").write_text(json.dumps(record, indent=2) + "\n")
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        return self._finish("export", {"path": str(d), "bytes": size})


def install(run_dir: str | Path, model: str | Path = DEFAULT_MODEL) -> Path:
    """Copy a finished run's adapter and decoder LoRA into the model folder (replacing what
    was there); the model then loads and serves as ImageRAGTurbo."""
    src = Path(run_dir) / "export"
    if not (src / "h_adapter").is_dir():
        raise FileNotFoundError(f"{src}/h_adapter missing: run the export stage first")
    dst = family.resolve(model)
    for sub in ("h_adapter", family.LORA_DIR, NB_DIR, "adapter_training.json"):
        target = dst / sub
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (src / sub).is_dir():
            shutil.copytree(src / sub, target)
        elif (src / sub).exists():
            shutil.copy2(src / sub, target)
    return dst
