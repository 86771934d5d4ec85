"""ShapesTIFA: TIFA's method (Hu et al., 2023) with a detector in place of the VQA model.

From each evaluation scene's spec come question-answer pairs, one set per element type the
caption states (TIFA's categories, as they apply to ShapesWorld):

========== ===================================================== ==========================
category   question                                              asked when
========== ===================================================== ==========================
object     Is there a {shape}?                                   always, per group
colour     What colour is the {shape}?                           the shape names one group
shape      What shape is the {colour} object?                    the colour names one group
counting   How many {colour} {shape}s are there?                 a group of two or more
size       Is the {colour} {shape} small or large?               the caption states size
spatial    Where is the {A} relative to the {B}?                 the caption states a relation
position   Where in the image is the {colour} {shape}?           the caption states a cell
========== ===================================================== ==========================

A classical detector (segmentation by hue and chroma, connected components, shape by nearest
template among augmented renders of ShapesWorld's own shapes) answers them from the pixels.
The score of an image is the fraction of its questions answered right; the benchmark score is
the mean over prompts (TIFA's definition); the per-category table is the accuracy over all
questions of that category (the paper's Figs. 3 and 5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import shapesworld as sw

CATEGORIES: tuple[str, ...] = ("object", "colour", "shape", "counting", "size", "spatial",
                               "position")

# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    category: str
    text: str
    choices: tuple[str, ...]
    answer: str
    query: tuple  # machine-readable form the detector answers: (kind, *args)


def _name(g: sw.Group) -> str:
    return f"{g.colour} {g.shape}"


def questions(scene: sw.Scene) -> list[Question]:
    """TIFA-style multiple-choice questions, each with its answer, from a scene spec."""
    qs: list[Question] = []
    shapes = [g.shape for g in scene.groups]
    colours = [g.colour for g in scene.groups]
    yes_no = ("yes", "no")
    for g in scene.groups:
        qs.append(Question("object", f"Is there a {g.shape}?", yes_no, "yes",
                           ("exists", g.shape)))
        if shapes.count(g.shape) == 1:
            qs.append(Question("colour", f"What colour is the {g.shape}?", tuple(sw.COLOURS),
                               g.colour, ("colour_of", g.shape)))
        if colours.count(g.colour) == 1:
            qs.append(Question("shape", f"What shape is the {g.colour} object?", sw.SHAPES,
                               g.shape, ("shape_of", g.colour)))
        if g.count >= 2:
            qs.append(Question("counting", f"How many {g.colour} {sw.PLURALS[g.shape]} are there?",
                               ("0", "1", "2", "3", "4", "5+"), str(g.count),
                               ("count", g.colour, g.shape)))
        if g.size_stated:
            qs.append(Question("size", f"Is the {_name(g)} small or large?", tuple(sw.SIZES),
                               g.size, ("size_of", g.colour, g.shape)))
    if scene.relation is not None:
        rel, a, b = scene.relation
        ga, gb = scene.groups[a], scene.groups[b]
        qs.append(Question("spatial", f"Where is the {_name(ga)} relative to the {_name(gb)}?",
                           sw.RELATIONS, rel,
                           ("relation", ga.colour, ga.shape, gb.colour, gb.shape)))
    if scene.cell is not None:
        g = scene.groups[0]
        qs.append(Question("position", f"Where in the image is the {_name(g)}?", sw.CELLS,
                           scene.cell, ("cell", g.colour, g.shape)))
    return qs


# ----------------------------------------------------------------------------- detector

WORK_RES = 64           # the detector works at 64x64 whatever the input size
CHROMA_MIN = 0.25       # pixel belongs to an object above this chroma (max - min of RGB)
MIN_AREA = 12           # px at 64x64; a small star covers about 45
TEMPLATE_SIM_MIN = 0.55  # cosine similarity to the nearest shape template, at least
DESC = 16               # side of the normalised mask descriptor
# Size threshold on the estimated box side, midway between small (12 px) and large (20.5 px).
LARGE_MIN_SIDE = 0.255 * WORK_RES

_PALETTE = np.array(list(sw.COLOURS.values()), dtype=np.float64) / 255.0
_COLOUR_NAMES = tuple(sw.COLOURS)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of an (..., 3) array in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


_PALETTE_HUE = _hue(_PALETTE)
_PALETTE_CHROMA = _PALETTE.max(-1) - _PALETTE.min(-1)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    x: float      # bounding-box centre, [0, 1] image coordinates
    y: float
    area: float   # px at 64x64
    score: float  # similarity to the shape template


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as float64 [WORK_RES, WORK_RES, 3] in [0, 1] (area-resampled if needed)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an RGB image array [H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    if image.size != (WORK_RES, WORK_RES):
        image = image.resize((WORK_RES, WORK_RES), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64) / 255.0


def _components(x: np.ndarray):
    """Yield (colour index, component mask, soft alpha) for each coloured blob."""
    x = ndimage.gaussian_filter(x, sigma=(0.6, 0.6, 0))  # takes the edge off pixel noise
    chroma = x.max(-1) - x.min(-1)
    hue = _hue(x)
    d = np.abs(hue[..., None] - _PALETTE_HUE)  # (H, W, 6)
    d = np.minimum(d, 360.0 - d)
    label = d.argmin(-1)
    mask = chroma > CHROMA_MIN
    for ci in range(len(_PALETTE)):
        comp, n = ndimage.label(mask & (label == ci))
        if n == 0:
            continue
        alpha = np.clip(chroma / _PALETTE_CHROMA[ci], 0.0, 1.0) * (label == ci)
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            m = comp[sl] == k
            if m.sum() < MIN_AREA:
                continue
            yield ci, comp == k, alpha, sl


def _mass(mask: np.ndarray, alpha: np.ndarray) -> float:
    """Soft area of a blob: its alpha summed over the blob grown by 2 px. Blur moves colour
    around but keeps its sum, so this stays near the true area where the thresholded mask's
    box shrinks (a blurred star loses its points) or grows."""
    return float(alpha[ndimage.binary_dilation(mask, iterations=2)].sum())


def _descriptor(alpha: np.ndarray, sl: tuple[slice, slice], shape_hw) -> np.ndarray:
    """The blob's soft mask in its bounding box, resized to DESC x DESC, zero-mean, unit-norm."""
    y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, shape_hw[0])
    x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, shape_hw[1])
    crop = alpha[y0:y1, x0:x1].astype(np.float32)
    img = Image.fromarray(crop, mode="F").resize((DESC, DESC), Image.Resampling.BILINEAR)
    v = np.asarray(img, dtype=np.float64).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-8)


@lru_cache(maxsize=1)
def shape_templates() -> tuple[np.ndarray, tuple[str, ...], dict[str, float]]:
    """Descriptors of every shape rendered alone at both sizes, several sub-pixel offsets and
    blur levels (the augmentation a one-step generator's blur calls for), and each shape's
    fill fraction (soft area / box side squared). Built from the world's own renderer,
    deterministically, in well under a second."""
    descs, names, fills = [], [], {}
    for shape in sw.SHAPES:
        for size in sw.SIZES:
            for off in (0.0, 0.3, 0.6):
                scene = sw.Scene("single", [sw.Group(shape, "red", size)],
                                 objects=[(0, 0.5 + off / WORK_RES, 0.5 + off / WORK_RES)])
                base = np.asarray(sw.render(scene, WORK_RES), dtype=np.float64) / 255.0
                for blur in (0.0, 0.8, 1.3, 1.8, 2.3):
                    x = ndimage.gaussian_filter(base, (blur, blur, 0)) if blur else base
                    for _ci, mask, alpha, sl in _components(x):
                        descs.append(_descriptor(alpha, sl, alpha.shape))
                        names.append(shape)
                        side = sw.SIZES[size] * WORK_RES
                        fills.setdefault(shape, []).append(_mass(mask, alpha) / side**2)
    return np.stack(descs), tuple(names), {k: float(np.median(v)) for k, v in fills.items()}


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in an image: colour, shape, size, centroid. Blobs that match no shape template
    well enough (noise, smears) are dropped."""
    x = to_array(image)
    templates, names, fills = shape_templates()
    out = []
    for ci, mask, alpha, sl in _components(x):
        desc = _descriptor(alpha, sl, alpha.shape)
        sims = templates @ desc
        best = int(sims.argmax())
        if sims[best] < TEMPLATE_SIM_MIN:
            continue
        side = float(np.sqrt(_mass(mask, alpha) / fills[names[best]]))
        out.append(Detection(
            colour=_COLOUR_NAMES[ci], shape=names[best],
            size="large" if side >= LARGE_MIN_SIDE else "small",
            # the box centre, as the scene spec places objects (a triangle's centroid is lower)
            x=float((sl[1].start + sl[1].stop) / 2 / x.shape[1]),
            y=float((sl[0].start + sl[0].stop) / 2 / x.shape[0]),
            area=float(mask.sum()), score=float(sims[best]),
        ))
    return out


def answer(query: tuple, dets: Sequence[Detection]) -> str | None:
    """The detector's answer to one question (None: it finds nothing to answer with)."""
    kind, *args = query

    def match(colour=None, shape=None):
        return [d for d in dets if (colour is None or d.colour == colour)
                and (shape is None or d.shape == shape)]

    def biggest(ms):
        return max(ms, key=lambda d: d.area) if ms else None

    if kind == "exists":
        return "yes" if match(shape=args[0]) else "no"
    if kind == "colour_of":
        d = biggest(match(shape=args[0]))
        return d.colour if d else None
    if kind == "shape_of":
        d = biggest(match(colour=args[0]))
        return d.shape if d else None
    if kind == "count":
        n = len(match(*args))
        return str(n) if n < 5 else "5+"
    if kind == "size_of":
        d = biggest(match(*args))
        return d.size if d else None
    if kind == "relation":
        a, b = biggest(match(args[0], args[1])), biggest(match(args[2], args[3]))
        return sw.relation_of((a.x, a.y), (b.x, b.y)) if a and b else None
    if kind == "cell":
        d = biggest(match(*args))
        return sw.cell_of(d.x, d.y) if d else None
    raise ValueError(f"unknown question kind {kind!r}")


# ----------------------------------------------------------------------------- scoring


@dataclass
class PromptResult:
    id: str
    caption: str
    correct: list[bool]
    categories: list[str]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 1.0


def score_image(scene: sw.Scene, image) -> tuple[list[Question], list[str | None]]:
    dets = detect(image)
    qs = questions(scene)
    return qs, [answer(q.query, dets) for q in qs]


def score(records: Sequence[tuple[str, str, sw.Scene]], images: Sequence) -> dict:
    """ShapesTIFA over prompts: ``records`` are (id, caption, scene), ``images`` one image per
    record (PIL or array). Returns ``{"tifa", "categories", "n_prompts", "n_questions",
    "per_prompt"}``; tifa is the mean per-prompt accuracy."""
    if len(records) != len(images):
        raise ValueError(f"{len(records)} prompts but {len(images)} images")
    results = []
    for (pid, cap, scene), img in zip(records, images):
        qs, answers = score_image(scene, img)
        results.append(PromptResult(pid, cap, [a == q.answer for q, a in zip(qs, answers)],
                                    [q.category for q in qs]))
    return summarise(results)


def summarise(results: Sequence[PromptResult]) -> dict:
    cats: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for r in results:
        for c, ok in zip(r.categories, r.correct):
            cats[c].append(ok)
    return {
        "tifa": float(np.mean([r.accuracy for r in results])) if results else float("nan"),
        "categories": {c: float(np.mean(v)) for c, v in cats.items() if v},
        "n_prompts": len(results),
        "n_questions": int(sum(len(r.correct) for r in results)),
        "per_prompt": [{"id": r.id, "caption": r.caption, "accuracy": r.accuracy}
                       for r in results],
    }


# ----------------------------------------------------------------------------- self-check


def degrade(img: Image.Image, rng: np.random.Generator, blur: float = 1.0,
            noise: float = 0.04, jitter: float = 0.05) -> np.ndarray:
    """What a weak one-step generator makes of a render: Gaussian blur (sigma in pixels at the
    image's size scaled to 64x64), additive Gaussian noise and a per-channel colour shift."""
    x = np.asarray(img, dtype=np.float64) / 255.0
    s = blur * x.shape[0] / WORK_RES
    x = ndimage.gaussian_filter(x, (s, s, 0))
    x = x + rng.normal(0.0, noise, x.shape) + rng.uniform(-jitter, jitter, (1, 1, 3))
    return np.clip(x, 0.0, 1.0)


def selfcheck(n: int = 500, seed: int = 0, resolution: int = 64, blur: float = 1.0,
              noise: float = 0.04) -> dict:
    """ShapesTIFA of the evaluation prompts on images whose right score is known:
    clean renders (~1), degraded renders (~1: the detector must be robust), Gaussian noise and
    blank images (~0), and renders with one stated attribute changed (clearly below clean)."""
    from tqdm import tqdm

    items = sw.make_split("eval", n, seed)
    records = [(it.id, it.caption, it.scene) for it in items]
    rng = np.random.default_rng([seed, 99])
    clean = [sw.render(it.scene, resolution) for it in tqdm(items, desc="render", leave=False)]
    variants = {
        "clean": clean,
        "degraded": [degrade(im, rng, blur=blur, noise=noise) for im in clean],
        "noise": [np.clip(rng.normal(0.5, 0.25, (resolution, resolution, 3)), 0, 1)
                  for _ in items],
        "blank": [Image.new("RGB", (resolution, resolution), sw.BACKGROUND) for _ in items],
        "perturbed": [sw.render(sw.perturb(it.scene, sw.item_rng(seed, "perturbed", i))[0],
                                resolution) for i, it in enumerate(items)],
    }
    out = {}
    for name, imgs in tqdm(variants.items(), desc="score", leave=False):
        out[name] = score(records, imgs)
    return out


def plot_categories(results: dict[str, dict], path: str | os.PathLike,
                    title: str = "ShapesTIFA by category") -> Path:
    """A grouped bar chart (PNG) of per-category accuracy, one bar per method: the paper's
    Figs. 3 and 5 for ShapesWorld."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in CATEGORIES if any(c in r["categories"] for r in results.values())]
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cats)), max(3.6, 0.2 * len(names))),
                           dpi=120)
    xs = np.arange(len(cats))
    # the default cycle repeats after 10 colours; more methods than that get tab20's, and
    # past 20 the colours come round again hatched
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    for k, name in enumerate(names):
        vals = [results[name]["categories"].get(c, np.nan) for c in cats]
        ax.bar(xs + (k - (len(names) - 1) / 2) * width, vals, width,
               color=colours[k % len(colours)], hatch="//" if k >= len(colours) else None,
               label=f"{name} ({results[name]['tifa']:.3f})")
    ax.set_xticks(xs, cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    # right of the axes, one name a line (the figure grows with the names); "tight" widens
    # the saved figure to hold it (a legend below, wider than the axes, was cut off)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def score_folder(dataset: str | os.PathLike, images: str | os.PathLike,
                 split: str = "eval") -> dict:
    """Score a folder of generated images named ``<id>.png`` (or the data set's own image
    paths) against a data set's manifest."""
    recs = sw.load_manifest(dataset, split)
    images = Path(images)
    records, imgs = [], []
    missing = []
    for r in recs:
        p = images / f"{r['id']}.png"
        if not p.exists():
            p = images / r.get("image", "")
        if not p.is_file():
            missing.append(r["id"])
            continue
        records.append((r["id"], r["caption"], sw.Scene.from_json(r["scene"])))
        imgs.append(Image.open(p).convert("RGB"))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(recs)} images missing in {images} "
                                f"(first: {missing[0]}.png)")
    return score(records, imgs)


def dumps(result: dict, per_prompt: bool = False) -> str:
    r = dict(result)
    if not per_prompt:
        r.pop("per_prompt", None)
    return json.dumps(r, indent=2, sort_keys=False)
