"""Streamed training caches: a folder of shards (``shard-NNNNN.pt``, tensors with one row per
item) with a manifest of counts and sha256 digests, written shard by shard so that a stage
killed midway resumes at the first incomplete shard, and read back as a stream whose memory
does not grow with the data set (one shard plus a bounded shuffle buffer at a time).

Layout of a shard folder ``DIR``:

- ``DIR/plan.json``: what the shards are cut from (``fingerprint``) and how (``shards``, the
  number of shards, ``shard_items``); a partial folder with another plan is cleared.
- ``DIR/shard-NNNNN.pt``: ``torch.save`` of a dict of tensors (rows = the shard's items;
  ``weights_only`` loadable), written to a temporary name and renamed.
- ``DIR/shard-NNNNN.json``: written after its shard: ``{"index", "items", "bytes",
  "sha256", ...}`` plus what the writer records (the rows' metadata, the bad images, ...).
  A shard counts as done when its sidecar exists and the file's size and sha256 match it.
- ``DIR/manifest.json``: written last, by the main process, once every shard is done:
  ``{"format", "version", "shards": [{"name", "items", "first", "bytes", "sha256", ...}],
  "items", "fields": {name: [shape, dtype]}, ...}``; ``first`` is the shard's first row in
  the global row order (the shards' rows, in shard order).

Under ``accelerate launch`` shard ``i`` is written by process ``i mod N`` (``mine``); with
one process it writes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

FORMAT = "imageragturbo-train-shards"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.pt"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def items_per_shard(shard_mb: float, bytes_per_item: int) -> int:
    """How many items make a shard of about ``shard_mb`` MiB (at least one)."""
    return max(1, int(shard_mb * 2 ** 20 // max(1, bytes_per_item)))


def cut(n: int, per_shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard over ``n`` slots."""
    return [(a, min(n, a + per_shard)) for a in range(0, n, per_shard)] or [(0, 0)]


def mine(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards process ``rank`` of ``world`` writes: ``i mod world == rank``."""
    return [i for i in range(n_shards) if i % world == rank]


def prepare(root: Path, plan: dict, is_main: bool) -> None:
    """Start or resume a shard folder: one with another ``plan`` (its shards cut from other
    data or otherwise) is cleared first. Only the main process writes."""
    root.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return
    path = root / PLAN
    before = json.loads(path.read_text()) if path.exists() else None
    if before != plan:
        for p in root.iterdir():
            if p.name.startswith("shard-") or p.name in (MANIFEST, PLAN):
                p.unlink()
        _write_json(path, plan)


def done(root: Path, i: int) -> dict | None:
    """Shard ``i``'s sidecar when the shard is complete and intact, else None."""
    side, path = root / f"shard-{i:05d}.json", root / shard_name(i)
    if not (side.exists() and path.exists()):
        return None
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return None
    if meta.get("bytes") != path.stat().st_size or meta.get("sha256") != sha256_of(path):
        return None
    return meta


def write(root: Path, i: int, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Shard ``i``: the tensors (renamed into place), then its sidecar with size and sha256;
    ``meta`` must hold ``items``, the shard's row count."""
    path = root / shard_name(i)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    meta = {**meta, "index": i, "name": path.name, "bytes": path.stat().st_size,
            "sha256": sha256_of(path)}
    _write_json(root / f"shard-{i:05d}.json", meta)
    return meta


def load(root: Path, i: int) -> dict[str, torch.Tensor]:
    return torch.load(root / shard_name(i), weights_only=True, map_location="cpu")


def finalize(root: Path, n_shards: int, extra: dict | None = None) -> dict:
    """The manifest, once every shard is done (checked: counts, sizes, sha256): each shard's
    sidecar less its bulky entries (``rows``, ``bad``), and ``first``, its first global row."""
    shards, first = [], 0
    for i in range(n_shards):
        meta = done(root, i)
        if meta is None:
            raise RuntimeError(f"{root}: shard {i} is missing or damaged; rerun the stage")
        entry = {k: v for k, v in meta.items() if k not in ("rows", "bad")}
        entry["first"] = first
        first += int(meta["items"])
        shards.append(entry)
    manifest = {"format": FORMAT, "version": VERSION, "items": first, "shards": shards,
                **(extra or {})}
    _write_json(root / MANIFEST, manifest)
    return manifest


def manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the stage that writes it has not finished")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return m


def sidecars(root: Path, n_shards: int) -> Iterator[dict]:
    for i in range(n_shards):
        yield json.loads((root / f"shard-{i:05d}.json").read_text())


def read_all(root: Path, fields: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every shard's ``fields`` concatenated: for small runs, tests and inspection only (the
    training loop streams)."""
    m = manifest(root)
    parts: dict[str, list] = {f: [] for f in fields}
    for s in m["shards"]:
        t = load(root, int(s["index"]))
        for f in fields:
            if f in t:
                parts[f].append(t[f])
    return {f: torch.cat(v) for f, v in parts.items() if v}


class Stream:
    """An endless stream of items (dicts of one row of each field, cloned, plus ``row``: the
    item's global row) from the shards of one or more shard folders.

    Each epoch visits the shards in a seeded random order, process ``rank`` of ``world``
    taking every ``world``-th of them (all of them when there are fewer shards than
    processes); the rows pass through a shuffle buffer of ``buffer`` items. Memory: one shard
    and the buffer. The stream is a function of (``seed``, ``rank``, ``world``), so a resumed
    run that draws as many items as before continues exactly (``skip``).

    ``rows(shard_meta)`` -> how many leading rows of a shard to take (default all): the real
    pairs come first in a data shard."""

    def __init__(self, root: Path, fields: Sequence[str], seed: int, rank: int = 0,
                 world: int = 1, buffer: int = 1024, key: int = 0, rows=None):
        self.root, self.fields = Path(root), tuple(fields)
        self.shards = [s for s in manifest(self.root)["shards"]
                       if (rows(s) if rows else int(s["items"])) > 0]
        if not self.shards:
            raise ValueError(f"{root}: no items to stream")
        self.take = rows or (lambda s: int(s["items"]))
        total = sum(self.take(s) for s in self.shards)
        self.seed, self.rank, self.world, self.key = seed, rank, world, key
        self.buffer = max(1, min(buffer, total))   # never more than the items there are
        self._it = self._items()

    def _items(self) -> Iterator[dict]:
        buf: list[dict] = []
        rng = np.random.default_rng([self.seed, self.key, 1, self.rank])
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, self.key, 0, epoch]).permutation(len(self.shards))
            picked = order[self.rank::self.world] if len(order) >= self.world else order
            for j in picked:
                s = self.shards[int(j)]
                t = load(self.root, int(s["index"]))
                for r in range(self.take(s)):
                    item = {f: t[f][r].clone() for f in self.fields}
                    item["row"] = int(s["first"]) + r
                    if len(buf) < self.buffer:
                        buf.append(item)
                        continue
                    k = int(rng.integers(self.buffer))
                    out, buf[k] = buf[k], item
                    yield out
                del t
            epoch += 1

    def draw(self, n: int) -> list[dict]:
        return [next(self._it) for _ in range(n)]

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self._it)
