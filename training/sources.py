"""Where ``train adapter``'s training items come from: ShapesWorld (the shipped recipe, rendered
in ``steps.training_data``), a user's text-image pairs, and a file of prompts for the
teacher's synthetic pairs (paper Sec. 4.1: real images and the teacher's samples for
prompts).

Pairs come as the files the index build reads (``retriever.pairs.read_pairs``: JSONL or
Parquet rows of caption, image path and optional id) or as WebDataset tar shards, the form
LAION-scale tooling (img2dataset) writes: ``KEY.jpg`` / ``.png`` / ``.webp`` beside
``KEY.txt`` (the caption) or ``KEY.json`` (with a ``caption`` field), consecutive members
grouped by key as webdataset groups them (the key: the member's path up to the first dot of
its base name). The shards are read with Python's ``tarfile``: the format is a plain tar whose
grouping is that one rule, and the webdataset package (not in requirements.lock) would add a
dependency whose decoding pipeline hides the per-sample failures that the run must report
(bad images are skipped, counted and listed by path, never silently dropped).

Nothing here decodes more than one image at a time: the data stage streams them.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imageragturbo.images import (
    MISSING,
    NO_CAPTION,
    BadImage,
    content_hash,
    decode,
    normalise,
    read_bytes,
)

SHAPESWORLD = "shapesworld"  # the ``--pairs`` name of the shipped recipe's source
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a WebDataset sample's image, first found wins
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Item:
    """One training pair to read: ``image`` is a file path, or with ``shard`` the name of the
    image's member in that tar (None when the sample has none)."""

    id: str
    caption: str
    image: str | None
    shard: str | None = None

    @property
    def where(self) -> str:
        """The image's location as a report names it: a path, or ``SHARD:MEMBER``."""
        if self.shard is None:
            return str(self.image)
        return f"{self.shard}:{self.image if self.image is not None else self.id + '.*'}"


def expand(spec: str) -> list[str]:
    """A ``--pairs`` argument as files: brace ranges as webdataset writes them
    (``shards/{00000..00099}.tar``, zero padding kept) and shell globs; a spec that names
    nothing existing is returned as it is (the reader then says it is missing)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a) if a.startswith("0") else 0
        return [f for i in range(int(a), int(b) + 1)
                for f in expand(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])]
    if any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no pairs file matches {spec}")
        return found
    return [spec]


def is_tar(path: str) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _split_key(name: str) -> tuple[str, str] | None:
    """webdataset's rule: ``dir/KEY.EXT.MORE`` -> (``dir/KEY``, ``ext.more``)."""
    m = re.match(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else None


def _tar_groups(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive regular members grouped by key, in the tar's order."""
    key, group = None, {}
    for m in tf:
        if not m.isfile():
            continue
        split = _split_key(m.name)
        if split is None:
            continue
        k, ext = split
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext] = m
    if group:
        yield key, group


def _tar_caption(tf: tarfile.TarFile, group: dict[str, tarfile.TarInfo]) -> str:
    if "txt" in group:
        return tf.extractfile(group["txt"]).read().decode("utf-8").strip()
    if "json" in group:
        meta = json.loads(tf.extractfile(group["json"]).read())
        cap = meta.get("caption") if isinstance(meta, dict) else None
        return cap.strip() if isinstance(cap, str) else ""
    return ""


def list_tar(path: str) -> tuple[list[Item], list[dict]]:
    """A WebDataset shard's samples (captions read, images not), and the samples that are
    bad already: no caption, or no image."""
    items, bad = [], []
    try:
        tf = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise FileNotFoundError(f"no pairs file {path}") from None
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar shard ({e})") from None
    with tf:
        for key, group in _tar_groups(tf):
            img = next((group[e].name for e in IMAGE_EXTS if e in group), None)
            try:
                caption = _tar_caption(tf, group)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                caption, detail = "", f"unreadable caption ({type(e).__name__})"
            else:
                detail = "no KEY.txt and no caption in KEY.json"
            item = Item(key, caption, img, shard=str(path))
            if img is None:
                bad.append(bad_entry(item, BadImage(MISSING, f"sample {key} has no image "
                                                             f"({', '.join(IMAGE_EXTS)})")))
            elif not caption:
                bad.append(bad_entry(item, BadImage(NO_CAPTION, detail)))
            else:
                items.append(item)
    return items, bad


def list_pairs(specs: Iterable[str]) -> tuple[list[Item], list[dict]]:
    """The pairs of every ``--pairs`` file, in order (JSONL / Parquet as the index build reads
    them, ids defaulting to ``FILE:ROW``; tar shards by key), and those already bad."""
    from imageragturbo.retriever.pairs import read_pairs

    items: list[Item] = []
    bad: list[dict] = []
    for spec in specs:
        for path in expand(str(spec)):
            if is_tar(path):
                got, b = list_tar(path)
                items += got
                bad += b
                continue
            for p in read_pairs(path, id_prefix=f"{Path(path).name}:"):
                item = Item(p.id, p.caption.strip(), p.image)
                if item.caption:
                    items.append(item)
                else:
                    bad.append(bad_entry(item, BadImage(NO_CAPTION, "empty caption")))
    seen: dict[str, Item] = {}
    for it in items:
        if it.id in seen:
            raise ValueError(f"pair id {it.id!r} appears twice ({seen[it.id].where} and "
                             f"{it.where}): ids must be unique across the pairs files")
        seen[it.id] = it
    return items, bad


def bad_entry(item: Item, err: BadImage) -> dict:
    """One line of the data report's list of skipped pairs."""
    return {"id": item.id, "image": item.where, "reason": err.reason, "detail": err.detail}


def image_bytes(items: list[Item]) -> Iterator[tuple[Item, bytes | BadImage]]:
    """Each item's encoded image, in the order given; a tar shard is read once, in member
    order (its items must come in that order, as ``list_pairs`` gives them)."""
    i = 0
    while i < len(items):
        it = items[i]
        if it.shard is None:
            try:
                yield it, read_bytes(it.image)
            except BadImage as e:
                yield it, e
            i += 1
            continue
        j = i
        while j < len(items) and items[j].shard == it.shard:
            j += 1
        wanted = {x.image: x for x in items[i:j]}
        with tarfile.open(it.shard, "r:*") as tf:
            for m in tf:
                x = wanted.pop(m.name, None)
                if x is not None:
                    yield x, tf.extractfile(m).read()
        for x in wanted.values():  # listed, yet gone from the shard since
            yield x, BadImage(MISSING, f"{x.where} is no longer in the shard")
        i = j


def load_images(items: list[Item], size: int, min_side: int
                ) -> Iterator[tuple[Item, object, str | None]]:
    """Each item as ``(item, (size, size, 3) uint8 array, content hash)``, or
    ``(item, BadImage, None)`` when its image is missing, corrupt or too small."""
    for it, data in image_bytes(items):
        if isinstance(data, BadImage):
            yield it, data, None
            continue
        try:
            arr = normalise(decode(data, it.where), size, min_side)
        except BadImage as e:
            yield it, e, None
            continue
        yield it, arr, content_hash(data)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts for the teacher's synthetic pairs: a text file (one prompt per line, blank lines
    skipped) or JSONL (a ``prompt`` or ``caption`` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}")
    prompts = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                prompts.append(line.strip())
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            text = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: needs a string 'prompt' or 'caption' field")
            prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
