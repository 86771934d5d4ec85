"""ShapesWorld: a deterministic, procedurally generated text-image world for offline benchmarking.

A scene holds one or two *groups* of identical objects (shape, colour, size, count), at most
four objects in all, optionally one pairwise spatial relation between two single objects, or
the absolute position (a cell of a 3x3 grid) of a single object. Captions come from several
templates and paraphrases; the scene spec records what the caption states, so the ShapesTIFA
questions (``imageragturbo.tifa``) ask only about what the prompt says, as TIFA does.

Splits (see ``SPLITS``) make retrieval matter, as LAION-to-train / OpenImages-to-retrieve does
in the paper:

* ``train``: a long tail. Six (colour, shape) combinations never appear (``ABSENT``), six are
  rare (``RARE``, weight 0.03 against 1.0), and groups of four are rare.
* ``retrieval``: every combination and count equally likely, so it covers the tail.
* ``eval``: prompts weighted toward the tail (60 % contain an absent or rare combination) and
  toward composition (relations, counts, two groups).

Every item is drawn from its own ``numpy.random.Generator`` seeded with (seed, split, index), so
the same seed gives the same bytes, whatever the number of worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "cross": "crosses"}
# Six hues about 50-60 degrees apart, saturated, on a neutral background: blur mixes an
# object with grey, which lowers its chroma but keeps its hue, so colour survives blur.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (232, 208, 28),
    "green": (40, 168, 64),
    "cyan": (28, 186, 200),
    "blue": (44, 72, 222),
    "purple": (168, 52, 210),
}
BACKGROUND = (236, 236, 236)
# Object bounding-box side as a fraction of the image side (12 px and 20.5 px at 64x64).
SIZES: dict[str, float] = {"small": 0.19, "large": 0.32}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
# 3x3 grid of absolute positions, row-major from the top left.
CELLS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                          "bottom left", "bottom", "bottom right")
CELL_PHRASES = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "at the top center"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
WRAPPERS = ("{}", "a picture of {}", "an image showing {}", "a drawing of {}",
            "{} on a plain background")
GROUP_JOINERS = ("{} and {}", "{} together with {}", "{} as well as {}")

COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
# The long tail of the training split. One absent and one rare combination per colour, with
# every colour and every shape still present in training on its own.
ABSENT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("yellow", "square"), ("green", "cross"),
    ("cyan", "triangle"), ("blue", "circle"), ("purple", "star"),
})
RARE: frozenset[tuple[str, str]] = frozenset({
    ("red", "cross"), ("yellow", "triangle"), ("green", "circle"),
    ("cyan", "star"), ("blue", "square"), ("purple", "triangle"),
})
RARE_WEIGHT = 0.03  # a rare combination is drawn 0.03 times as often as a common one in train
MIN_GAP = 0.08      # free space between object boxes, fraction of the side (5 px at 64x64)
REL_MIN = 0.22      # a relation's dominant-axis offset between centres, at least
REL_RATIO = 0.6     # ... and the other axis's offset at most this times the dominant one


@dataclass(frozen=True)
class SplitSpec:
    """How one split draws its scenes."""

    kinds: dict[str, float]                # scene kind -> probability
    count_weights: dict[int, float]        # group size (2..4) -> weight, for "count" scenes
    combo_weight: dict[str, float]         # "common" / "rare" / "absent" -> weight
    tail_fraction: float = 0.0             # probability that a scene is forced to hold a tail combo
    size_stated: float = 0.5               # probability that a caption states a group's size
    position_stated: float = 0.5           # probability that a single-object caption states its cell
    default_count: int = 0


SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec(
        kinds={"single": 0.35, "count": 0.2, "pair": 0.3, "group": 0.15},
        count_weights={2: 0.6, 3: 0.35, 4: 0.05},
        combo_weight={"common": 1.0, "rare": RARE_WEIGHT, "absent": 0.0},
        default_count=20000,
    ),
    "retrieval": SplitSpec(
        kinds={"single": 0.25, "count": 0.25, "pair": 0.25, "group": 0.25},
        count_weights={2: 1.0, 3: 1.0, 4: 1.0},
        combo_weight={"common": 1.0, "rare": 1.0, "absent": 1.0},
        default_count=10000,
    ),
    "eval": SplitSpec(
        kinds={"single": 0.15, "count": 0.25, "pair": 0.4, "group": 0.2},
        count_weights={2: 1.0, 3: 1.0, 4: 1.0},
        combo_weight={"common": 1.0, "rare": 1.0, "absent": 1.0},
        tail_fraction=0.6,
        size_stated=0.6,
        position_stated=0.7,
        default_count=500,
    ),
}
SPLIT_IDS = {"train": 0, "retrieval": 1, "eval": 2, "perturbed": 3}


def combo_class(colour: str, shape: str) -> str:
    """'absent', 'rare' or 'common': the combination's place in the training long tail."""
    if (colour, shape) in ABSENT:
        return "absent"
    if (colour, shape) in RARE:
        return "rare"
    return "common"


# --------------------------------------------------------------------------- scenes


@dataclass
class Group:
    """``count`` identical objects."""

    shape: str
    colour: str
    size: str
    count: int = 1
    size_stated: bool = False


@dataclass
class Scene:
    """A scene spec: groups, an optional relation or cell, and the objects' placed centres.

    ``relation`` is ``(rel, a, b)``: group ``a`` is ``rel`` group ``b`` (both single objects).
    ``cell`` is the grid cell of group 0 (a single object), stated in the caption.
    ``objects`` are ``(group index, x, y)`` centres in [0, 1] image coordinates, y down.
    """

    kind: str
    groups: list[Group]
    relation: tuple[str, int, int] | None = None
    cell: str | None = None
    objects: list[tuple[int, float, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "groups": [vars(g).copy() for g in self.groups],
            "relation": list(self.relation) if self.relation else None,
            "cell": self.cell,
            "objects": [[g, round(x, 5), round(y, 5)] for g, x, y in self.objects],
        }

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        rel = d.get("relation")
        return cls(
            kind=d["kind"],
            groups=[Group(**g) for g in d["groups"]],
            relation=(rel[0], int(rel[1]), int(rel[2])) if rel else None,
            cell=d.get("cell"),
            objects=[(int(g), float(x), float(y)) for g, x, y in d.get("objects", [])],
        )

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def tail_combos(self) -> list[str]:
        """The absent or rare (in train) combinations this scene holds, as 'colour shape'."""
        return sorted({f"{g.colour} {g.shape}" for g in self.groups
                       if combo_class(g.colour, g.shape) != "common"})


def _choice(rng: np.random.Generator, items: Sequence, weights: Sequence[float] | None = None):
    if weights is None:
        return items[int(rng.integers(len(items)))]
    w = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def _draw_combo(rng: np.random.Generator, spec: SplitSpec, exclude: Iterable[tuple[str, str]] = (),
                tail_only: bool = False) -> tuple[str, str]:
    excl = set(exclude)
    combos = [c for c in COMBOS if c not in excl]
    if tail_only:
        combos = [c for c in combos if combo_class(*c) != "common"]
    weights = [spec.combo_weight[combo_class(*c)] for c in combos]
    return _choice(rng, combos, weights)


def sample_scene(rng: np.random.Generator, spec: SplitSpec) -> Scene:
    """Draw one scene (unplaced groups and constraints) from a split's distribution."""
    kinds = list(spec.kinds)
    kind = _choice(rng, kinds, [spec.kinds[k] for k in kinds])
    force_tail = rng.random() < spec.tail_fraction

    def group(count: int, exclude=(), tail=False) -> Group:
        colour, shape = _draw_combo(rng, spec, exclude, tail_only=tail)
        size = _choice(rng, list(SIZES))
        return Group(shape, colour, size, count, bool(rng.random() < spec.size_stated))

    if kind == "single":
        g = group(1, tail=force_tail)
        cell = _choice(rng, CELLS) if rng.random() < spec.position_stated else None
        return Scene(kind, [g], cell=cell)
    if kind == "count":
        counts = sorted(spec.count_weights)
        n = _choice(rng, counts, [spec.count_weights[c] for c in counts])
        return Scene(kind, [group(n, tail=force_tail)])
    # Two groups: the first may be forced into the tail, the second is drawn freely.
    g0 = group(1, tail=force_tail)
    g1 = group(1, exclude=[(g0.colour, g0.shape)])
    if kind == "pair":
        return Scene(kind, [g0, g1], relation=(_choice(rng, RELATIONS), 0, 1))
    # "group": two groups, four objects at most.
    totals = [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 1)]
    c0, c1 = _choice(rng, totals)
    g0.count, g1.count = c0, c1
    order = [g0, g1] if rng.random() < 0.5 else [g1, g0]
    return Scene(kind, order)


def _cell_bounds(cell: str, half: float) -> tuple[tuple[float, float], tuple[float, float]]:
    idx = CELLS.index(cell)
    row, col = divmod(idx, 3)

    def span(k: int) -> tuple[float, float]:
        centre = (k + 0.5) / 3
        lo, hi = centre - 0.07, centre + 0.07
        return max(lo, half + 0.02), min(hi, 1 - half - 0.02)

    return span(col), span(row)


def cell_of(x: float, y: float) -> str:
    """The 3x3 grid cell holding the point (x, y) in [0, 1] image coordinates."""
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return CELLS[row * 3 + col]


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where a lies relative to b, by the dominant axis of their centres' offset."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _relation_ok(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    dx, dy = a[0] - b[0], a[1] - b[1]
    if rel in ("left of", "right of"):
        major, minor = (-dx if rel == "left of" else dx), abs(dy)
    else:
        major, minor = (-dy if rel == "above" else dy), abs(dx)
    return major >= REL_MIN and minor <= REL_RATIO * major


def place(scene: Scene, rng: np.random.Generator, max_tries: int = 200) -> Scene:
    """Give every object a centre: inside the image, boxes ``MIN_GAP`` apart, with the scene's
    relation or cell honoured. Rejection sampling, deterministic for a given ``rng``."""
    sides = [SIZES[g.size] for g in scene.groups for _ in range(g.count)]
    gids = [i for i, g in enumerate(scene.groups) for _ in range(g.count)]
    rel_check = None
    if scene.relation is not None:
        rel, a, b = scene.relation
        ia, ib = gids.index(a), gids.index(b)
        rel_check = (rel, ia, ib)
    for _ in range(max_tries):
        # Sequential placement: each object gets up to 100 draws, then the whole scene restarts.
        centres: list[tuple[float, float]] = []
        for side, gid in zip(sides, gids):
            half = side / 2
            if scene.cell is not None and gid == 0:
                (x0, x1), (y0, y1) = _cell_bounds(scene.cell, half)
            else:
                x0 = y0 = half + 0.02
                x1 = y1 = 1 - half - 0.02
            for _ in range(100):
                x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
                if all(abs(x - cx) >= (side + cs) / 2 + MIN_GAP
                       or abs(y - cy) >= (side + cs) / 2 + MIN_GAP
                       for (cx, cy), cs in zip(centres, sides)):
                    k = len(centres)
                    if rel_check is not None and k == max(rel_check[1], rel_check[2]):
                        pts = {k: (x, y)}
                        other = min(rel_check[1], rel_check[2])
                        pts[other] = centres[other]
                        if not _relation_ok(rel_check[0], pts[rel_check[1]], pts[rel_check[2]]):
                            continue
                    centres.append((x, y))
                    break
            else:
                break
        if len(centres) == len(sides):
            scene.objects = [(g, x, y) for g, (x, y) in zip(gids, centres)]
            return scene
    raise RuntimeError(f"could not place scene {scene.to_json()} in {max_tries} tries")


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def group_phrase(g: Group, rng: np.random.Generator) -> str:
    size = f"{_choice(rng, SIZE_WORDS[g.size])} " if g.size_stated else ""
    if g.count == 1:
        words = f"{size}{g.colour} {g.shape}"
        return f"{_article(words)} {words}"
    return f"{COUNT_WORDS[g.count]} {size}{g.colour} {PLURALS[g.shape]}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for the scene from randomly chosen templates and paraphrases."""
    phrases = [group_phrase(g, rng) for g in scene.groups]
    if scene.relation is not None:
        rel, a, b = scene.relation
        if rng.random() < 0.5:
            body = f"{phrases[a]} {_choice(rng, RELATION_PHRASES[rel])} {phrases[b]}"
        else:  # the same fact stated from the other object
            inverse = {"left of": "right of", "right of": "left of",
                       "above": "below", "below": "above"}[rel]
            body = f"{phrases[b]} {_choice(rng, RELATION_PHRASES[inverse])} {phrases[a]}"
    elif len(phrases) == 2:
        body = _choice(rng, GROUP_JOINERS).format(*phrases)
    else:
        body = phrases[0]
        if scene.cell is not None:
            body = f"{body} {_choice(rng, CELL_PHRASES[scene.cell])}"
    return _choice(rng, WRAPPERS).format(body)


# --------------------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """The outline of an axis-aligned shape of bounding-box side ``side`` centred at (cx, cy)."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        a = 0.18 * side  # half the arm width
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a),
                (cx + h, cy + a), (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h),
                (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a)]
    if shape == "star":
        pts = []
        outer, inner = h, 0.45 * h
        # Five points, one straight up; shifted down so the star's box is centred.
        shift = (h - h * math.cos(math.pi / 5)) / 2
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(ang), cy + shift + r * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, resolution: int = 64, supersample: int = 4,
           colour_override: dict[int, tuple[int, int, int]] | None = None) -> Image.Image:
    """Render a placed scene, anti-aliased by drawing at ``supersample`` times the resolution
    and box-filtering down. Deterministic: the same scene gives the same pixels."""
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    if not scene.objects:
        raise ValueError("scene has no placed objects; call place() first")
    big = resolution * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for gid, x, y in scene.objects:
        g = scene.groups[gid]
        rgb = (colour_override or {}).get(gid, COLOURS[g.colour])
        side = SIZES[g.size] * big
        cx, cy = x * big, y * big
        if g.shape == "circle":
            draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=rgb)
        else:
            draw.polygon(shape_polygon(g.shape, cx, cy, side), fill=rgb)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


# --------------------------------------------------------------------------- items & splits


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one item: independent of every other item, so any order gives the
    same data set."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


@dataclass
class Item:
    id: str
    split: str
    caption: str
    scene: Scene

    def to_json(self, image_path: str | None = None) -> dict:
        d = {"id": self.id, "split": self.split, "caption": self.caption}
        if image_path is not None:
            d["image"] = image_path
        d["scene"] = self.scene.to_json()
        d["tail"] = self.scene.tail_combos()
        return d


def make_item(seed: int, split: str, index: int) -> Item:
    spec = SPLITS[split]
    rng = item_rng(seed, split, index)
    scene = place(sample_scene(rng, spec), rng)
    return Item(f"{split}-{index:06d}", split, caption(scene, rng), scene)


def make_split(split: str, n: int | None = None, seed: int = 0) -> list[Item]:
    """All items of a split, in memory (no images)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    n = SPLITS[split].default_count if n is None else n
    if n < 0:
        raise ValueError(f"split size must be >= 0, got {n}")
    return [make_item(seed, split, i) for i in range(n)]
