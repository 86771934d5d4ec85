"""ShapesWorld on disk: ``build_dataset`` renders splits into a folder (PNG per item, a JSONL
manifest per split, ``world.json`` with statistics and checksums; written into
``<out>.partial`` and renamed at the end), ``load_manifest`` reads a split back,
``split_stats`` counts what a split holds, ``sample_grid`` draws samples with captions."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..checksums import sha256_file
from .world import (
    ABSENT,
    BACKGROUND,
    CELLS,
    COLOURS,
    COMBOS,
    RARE,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Item,
    Scene,
    combo_class,
    make_item,
    render,
)

# --------------------------------------------------------------------------- data set on disk


def _render_to_png(args: tuple[dict, int, str]) -> None:
    scene_json, resolution, path = args
    render(Scene.from_json(scene_json), resolution).save(path, format="PNG", optimize=False)


def build_dataset(out: str | os.PathLike, counts: dict[str, int] | None = None, seed: int = 0,
                  resolution: int = 64, workers: int | None = None, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Write the splits as PNG files plus one JSONL manifest per split and ``world.json``.

    Written into a temporary sibling folder and renamed into place at the end, so an
    interrupted build never leaves a folder that looks complete.
    """
    from tqdm import tqdm

    out = Path(out)
    counts = {s: SPLITS[s].default_count for s in SPLITS} if counts is None else dict(counts)
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to rebuild it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    workers = workers or min(4, os.cpu_count() or 1)
    summary = {}
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Serial() as pool:
        for split, n in counts.items():
            (tmp / split).mkdir()
            items = [make_item(seed, split, i)
                     for i in tqdm(range(n), desc=f"{split}: scenes", disable=not progress)]
            jobs = [(it.scene.to_json(), resolution, str(tmp / split / f"{i:06d}.png"))
                    for i, it in enumerate(items)]
            list(tqdm(pool.map(_render_to_png, jobs, chunksize=64), total=n,
                      desc=f"{split}: images", disable=not progress))
            with open(tmp / f"{split}.jsonl", "w") as f:
                for i, it in enumerate(items):
                    f.write(json.dumps(it.to_json(f"{split}/{i:06d}.png"), sort_keys=True) + "\n")
            summary[split] = split_stats(items)
    world = {
        "name": "ShapesWorld",
        "version": 1,
        "seed": seed,
        "resolution": resolution,
        "shapes": list(SHAPES),
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "background": list(BACKGROUND),
        "sizes": SIZES,
        "relations": list(RELATIONS),
        "cells": list(CELLS),
        "absent_in_train": sorted(f"{c} {s}" for c, s in ABSENT),
        "rare_in_train": sorted(f"{c} {s}" for c, s in RARE),
        "splits": summary,
        "manifests": {s: sha256_file(tmp / f"{s}.jsonl") for s in counts},
    }
    (tmp / "world.json").write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class _Serial:
    """A stand-in for a process pool with one worker (no processes spawned)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, it, chunksize=1):
        return map(fn, it)


def split_stats(items: Sequence[Item]) -> dict:
    """Counts that document a split's long tail: items, kinds, objects per combo class,
    items holding a tail combo, groups of four."""
    kinds: dict[str, int] = {}
    classes = {"common": 0, "rare": 0, "absent": 0}
    per_combo = {f"{c} {s}": 0 for c, s in COMBOS}
    tail_items = fours = 0
    for it in items:
        kinds[it.scene.kind] = kinds.get(it.scene.kind, 0) + 1
        for g in it.scene.groups:
            classes[combo_class(g.colour, g.shape)] += g.count
            per_combo[f"{g.colour} {g.shape}"] += g.count
            fours += g.count == 4
        tail_items += bool(it.scene.tail_combos())
    return {"items": len(items), "kinds": kinds, "objects_by_class": classes,
            "objects_by_combo": per_combo, "items_with_tail_combo": tail_items,
            "groups_of_four": fours}


def load_manifest(root: str | os.PathLike, split: str) -> list[dict]:
    """The records of one split of a data set written by ``build_dataset``."""
    path = Path(root) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no manifest {path}; build the data set with "
                                "`imageragturbo data build`")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_grid(items: Sequence[Item], path: str | os.PathLike, cols: int = 6,
                tile: int = 128) -> Path:
    """A PNG grid of rendered samples with their captions underneath."""
    from ..grids import caption_grid

    return caption_grid([np.asarray(render(it.scene, tile)) for it in items],
                        [it.caption for it in items], path, cols, tile)
