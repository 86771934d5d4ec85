"""The neighbours stage of ImageRAGTurbo fine-tuning (``training/adapter.py``'s ``AdapterRun``):
the retrieval index checked against the model (its keys from this text encoder, its cached H
features from this UNet encoder, paper Sec. 3.2), the proof that the retrieval database is
disjoint from the training pairs (ids, and content hashes for pairs read from files), and the
k_max neighbours of every training target by its pooled text key, with no target ever handed
back its own image.

``NeighbourStage`` is a mixin: ``AdapterRun`` supplies the run folder, the configuration, the
components and the stage bookkeeping (``stages.StagedRun``).
"""

from __future__ import annotations

import numpy as np
import torch

from imageragturbo.client.contract import check_h_shape
from imageragturbo.model.pipeline import tokenize
from imageragturbo.model.unet_split import UNetEncoder

from .stages import save_atomic


class NeighbourStage:
    """``stage_neighbours``, the index it searches and its checks, mixed into ``AdapterRun``."""

    def h_shape(self) -> tuple[int, ...]:
        """The student encoder's H-space feature shape (C, h, w) for this model's latents."""
        from imageragturbo.model.pipeline import latent_shape

        dev = next(self.c.unet.parameters()).device
        z = torch.zeros(1, *latent_shape(self.c), device=dev)
        text = self.c.text_encoder
        ids = tokenize(self.c.tokenizer, [""]).to(next(text.parameters()).device)
        with torch.no_grad():  # the empty prompt's states: no data cache needed
            ehs = text(ids).last_hidden_state.to(dev)
            h = UNetEncoder(self.c.unet)(z, torch.zeros(1, dtype=torch.long, device=dev), ehs)[0]
        return tuple(h.shape[1:])

    @property
    def index(self):
        """The retrieval index, checked against this model before anything trains: its keys
        must come from this text encoder and its cached H features from this UNet encoder."""
        if self._index is None:
            from imageragturbo.defaults import model_files_id
            from imageragturbo.model import load_retrieval_encoder
            from imageragturbo.retriever import IndexFormatError, RetrievalIndex
            from imageragturbo.retriever.ensure import ensure_index

            if self.cfg.shapesworld:
                path = ensure_index(str(self.cfg.model), self.index_dir, self.data_dir,
                                    quiet=not self.progress, load_encoder=load_retrieval_encoder)
            else:  # a user's index is never built behind their back from ShapesWorld
                path = self.index_dir
                if not (path / "manifest.json").is_file():
                    raise FileNotFoundError(
                        f"no retrieval index at {path}: build it from your retrieval pairs "
                        f"with `imageragturbo index build --pairs FILE --model "
                        f"{self.cfg.model} --out {path}`")
            want = model_files_id(str(self.model_dir), index=True)
            idx = RetrievalIndex.load(path, model_id=want,
                                      text_dim=int(self.c.text_encoder.config.hidden_size))
            check_h_shape(idx.manifest["shapes"]["h"][1:], self.h_shape(), path,
                          error=IndexFormatError)
            self._index = idx
        return self._index

    def _check_index(self, rows: list[dict], content: bool = True) -> dict:
        """The retrieval database is disjoint from the training pairs, or the run stops here,
        before anything trains: no index item has a training pair's id, and (``content``,
        for pairs read from files) none has a training image's content hash (sha256 of the
        file; the index's image files are hashed where they still exist, and those not found
        are counted). Prompts have no image and take no part."""
        from imageragturbo.checksums import sha256_file

        index = self.index
        train_ids = {r["id"] for r in rows if r["kind"] == "pair"}
        shared = train_ids & set(index.item_ids)
        if shared:
            raise ValueError(f"the index at {index.path} holds {len(shared)} training items "
                             f"(e.g. {sorted(shared)[:3]}): the retrieval database must be "
                             "disjoint from the training split")
        info: dict = {"training_items_in_index": 0}
        by_hash = {r["sha256"]: r for r in rows if r.get("sha256")}
        if not (content and by_hash):
            return info
        same, missing = [], 0
        for row, image in enumerate(index.images):
            try:
                digest = sha256_file(image)
            except OSError:
                missing += 1
                continue
            if digest in by_hash:
                same.append((by_hash[digest], row, image))
        if same:
            r, row, image = same[0]
            raise ValueError(f"the index at {index.path} holds {len(same)} images that are also "
                             f"training images (the same file content, sha256), e.g. training "
                             f"{r['id']!r} ({r['image']}) is index item "
                             f"{index.item_ids[row]!r} ({image}): the retrieval database must "
                             "be disjoint from the training pairs; remove them from one side")
        if missing:
            self._say(f"{missing} of the index's {len(index)} image files were not found: "
                      "their content was not compared with the training images")
        return {**info, "training_images_in_index": 0,
                "index_images_compared": len(index) - missing,
                "index_images_not_found": missing,
                "index_items_sha256": index.manifest["files"]["items"]["sha256"]}

    def stage_neighbours(self) -> dict:
        """The k_max neighbours of every training target by its pooled text key, with the
        proof that retrieval never hands a target back to itself: no retrieved item is a
        training item (ids; and by content hash for pairs read from files: ``_check_index``),
        and none has the target's very latent (content at the model's resolution). The
        targets are searched shard by shard (``data/shards``); the result, (N, k) ids and
        scores, is ``neighbours/neighbours.pt``."""
        from . import shards as sh

        cfg, d = self.cfg, self.dir / "neighbours"
        d.mkdir(exist_ok=True)
        info: dict = {"retrieval": cfg.retrieval}
        if cfg.retrieval == "index":
            index = self.index
            k = min(cfg.k_max, len(index))
            if k < cfg.k_max:
                self._say(f"k_max {cfg.k_max} is larger than the index ({len(index)} items); "
                          f"using k = {k}")
            rows = self.items
            # the content hashes again only for another index than the data stage compared
            checked = (self.done("data") or {}).get("index_items_sha256")
            info.update(self._check_index(
                rows, content=checked != index.manifest["files"]["items"]["sha256"]))
            # A scene drawn in both splits renders to the same image: such a neighbour would
            # be the target itself. Search a few extra and drop them (counted in done.json).
            extra = min(4, len(index) - k)
            src = self._shards_dir("data")
            m = sh.manifest(src)
            ids = np.empty((len(rows), k), np.int64)
            scores = np.empty((len(rows), k), np.float32)
            dropped = 0
            for s in m["shards"]:
                first, count, n_real = int(s["first"]), int(s["items"]), int(s["real"])
                if not count:
                    continue
                t = sh.load(src, int(s["index"]))
                captions = [r["caption"] for r in rows[first:first + count]]
                cand, cand_scores = index.search(t["pooled"].numpy(), k + extra,
                                                 prompts=captions, rerank=cfg.rerank)
                lat = t["latents"].numpy()          # [n_real, C, h, w] fp16: real pairs first
                for a in range(0, len(cand), 1024):
                    nb = index.latents(cand[a:a + 1024]).astype(np.float16)
                    mm = max(0, min(n_real - a, len(nb)))
                    same = np.zeros(nb.shape[:2], bool)
                    if mm:
                        same[:mm] = (nb[:mm] == lat[a:a + mm, None]).reshape(
                            mm, nb.shape[1], -1).all(-1)
                    for j, row in enumerate(same):
                        keep = np.flatnonzero(~row)[:k]
                        g = first + a + j
                        if len(keep) < k:
                            raise ValueError(f"training target {g} has fewer than {k} "
                                             "neighbours that are not its own image")
                        dropped += int(row[:k + int(row.sum())].sum())
                        ids[g], scores[g] = cand[a + j, keep], cand_scores[a + j, keep]
                # the proof, checked (not asserted: it must hold under python -O too)
                if n_real:
                    mine_ids = ids[first:first + n_real]
                    check = index.latents(mine_ids).astype(np.float16)
                    own = (check == lat[:, None]).reshape(n_real, k, -1).all(-1)
                    if own.any():
                        r = int(np.flatnonzero(own.any(1))[0])
                        raise ValueError(f"training target {first + r} has its own image "
                                         f"among its neighbours (index rows "
                                         f"{mine_ids[r][own[r]].tolist()})")
                del t
            if self.acc.is_main_process:
                save_atomic({"ids": torch.from_numpy(ids), "scores": torch.from_numpy(scores)},
                            d / "neighbours.pt")
            info.update({"index": str(index.path), "index_items": len(index), "k": k,
                         "targets": len(ids),
                         "dropped_neighbours_with_the_targets_image": dropped,
                         "neighbours_with_the_targets_image": 0,
                         "top1_similarity_mean": float(scores[:, 0].mean()),
                         "top1_similarity_p10": float(np.percentile(scores[:, 0], 10))})
        return self._finish("neighbours", info)
