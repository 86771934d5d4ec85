"""Edits of a placed scene: ``perturb`` (one stated attribute changed: the scorer's
self-check) and ``jitter`` (the layout nudged, captions still true: adapter training's
scene-neighbour augmentation)."""

from __future__ import annotations

import numpy as np

from .world import CELLS, COLOURS, SHAPES, SIZES, Scene, _choice, place


def perturb(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """The scene with exactly one stated attribute changed (colour, shape, size, count,
    relation or cell), re-placed; returns (new scene, what changed).

    Used by the scorer's self-check: a detector that answers the original scene's questions
    right on the perturbed render has missed the change."""
    new = Scene.from_json(scene.to_json())
    options = ["colour", "shape"]
    if any(g.size_stated for g in new.groups):
        options.append("size")
    if any(g.count >= 2 for g in new.groups):
        options.append("count")  # only groups of two or more are asked "how many"
    if new.relation is not None:
        options.append("relation")
    if new.cell is not None:
        options.append("cell")
    what = _choice(rng, options)
    gi = int(rng.integers(len(new.groups)))
    if what == "size":
        gi = _choice(rng, [i for i, g in enumerate(new.groups) if g.size_stated])
    elif what == "count":
        gi = _choice(rng, [i for i, g in enumerate(new.groups) if g.count >= 2])
    g = new.groups[gi]
    others = {(o.colour, o.shape) for j, o in enumerate(new.groups) if j != gi}
    if what == "colour":
        g.colour = _choice(rng, [c for c in COLOURS if c != g.colour and (c, g.shape) not in others])
    elif what == "shape":
        g.shape = _choice(rng, [s for s in SHAPES if s != g.shape and (g.colour, s) not in others])
    elif what == "size":
        g.size = "small" if g.size == "large" else "large"
    elif what == "count":
        g.count += 1 if new.n_objects < 4 and rng.random() < 0.5 else -1
    elif what == "relation":
        rel, a, b = new.relation
        new.relation = (rel, b, a)
    elif what == "cell":
        new.cell = _choice(rng, [c for c in CELLS if c != new.cell])
    return place(new, rng), what


def jitter(scene: Scene, rng: np.random.Generator, shift: float = 2 / 64,
           wobble: float = 1 / 64) -> Scene:
    """The same scene with its layout nudged: every object moved by one shared offset of up
    to ``shift`` and its own of up to ``wobble`` (fractions of the side; 2 and 1 px at
    64x64), each centre kept inside the image. Captions stay true (relations and cells are
    decided by far larger offsets). Adapter training renders these as an augmentation: a
    neighbour that shows the target's own scene, never an index item."""
    new = Scene.from_json(scene.to_json())
    dx, dy = rng.uniform(-shift, shift, 2)
    objs = []
    for gid, x, y in new.objects:
        half = SIZES[new.groups[gid].size] / 2
        ox, oy = rng.uniform(-wobble, wobble, 2)
        objs.append((gid, float(np.clip(x + dx + ox, half, 1 - half)),
                     float(np.clip(y + dy + oy, half, 1 - half))))
    new.objects = objs
    return new
