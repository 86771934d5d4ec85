"""``imageragturbo eval run``: generate the evaluation prompts with a pipeline and measure them.

Metrics (the paper's Tables 1-2 for ShapesWorld): ShapesTIFA (overall and per category), the
Frechet distance between generated images and real renders in the CLIP-score analogue's
image-feature space (FID's analogue), and the CLIP-score analogue (mean cosine similarity of
each image with its prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.defaults import DEFAULT_MODEL

from . import shapesworld as sw
from . import tifa
from .grids import caption_grid, row_grid


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(sa)) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean))


def generate(components, prompts: Sequence[str], seeds: Sequence[int], pipeline: str,
             steps: int = 1, guidance: float = 4.0, batch: int = 50,
             progress: bool = True) -> np.ndarray:
    """uint8 images (N, H, W, 3) for the prompts with the teacher (N steps, CFG) or the
    one-step student."""
    from tqdm import tqdm

    from .model.pipeline import student_generate, teacher_generate

    out = []
    for a in tqdm(range(0, len(prompts), batch), desc=f"{pipeline} x{steps}",
                  disable=not progress):
        p, s = list(prompts[a:a + batch]), list(seeds[a:a + batch])
        if pipeline == "teacher":
            out.append(teacher_generate(components, p, s, steps=steps, guidance=guidance))
        elif pipeline == "student":
            if steps != 1:
                raise ValueError("the student is a one-step model: use --steps 1")
            out.append(student_generate(components, p, s))
        else:
            raise ValueError(f"unknown pipeline {pipeline!r}: teacher or student")
    return np.concatenate(out)


def measure(components, scorer, items: Sequence[sw.Item], images: np.ndarray,
            reference: np.ndarray) -> dict:
    """ShapesTIFA, FD against ``reference`` renders, and the CLIP-score analogue."""
    import torch

    from .model.pipeline import encode_prompt

    res = tifa.score([(it.id, it.caption, it.scene) for it in items], list(images))
    with torch.no_grad():
        def feats(x):
            return np.concatenate([scorer.image.features(scorer.to_input(x[i:i + 256])).numpy()
                                   for i in range(0, len(x), 256)])

        fd = frechet_distance(feats(images), feats(reference))
        clip = []
        for i in range(0, len(items), 256):
            _, pooled = encode_prompt(components, [it.caption for it in items[i:i + 256]])
            # the scorer projects the text encoder's raw pooled output; encode_prompt
            # normalised it, and the projection is linear, so cosine is unchanged
            t = scorer.encode_text(pooled)
            v = scorer.encode_image(scorer.to_input(images[i:i + 256]))
            clip.append((t * v).sum(-1).numpy())
    return {"tifa": res["tifa"], "categories": res["categories"], "fd": fd,
            "clip": float(np.concatenate(clip).mean()), "n_prompts": res["n_prompts"],
            "per_prompt": res["per_prompt"]}


def run(model: str = DEFAULT_MODEL, pipeline: str = "student", steps: int = 1,
        guidance: float = 4.0, n: int = 500, seed: int = 0, grid: str | Path | None = None,
        progress: bool = True, k: int = 4, strength: float | None = None,
        index: str | Path | None = None) -> dict:
    """Generate the first ``n`` evaluation prompts with ``pipeline`` and measure them:
    ``teacher`` (``steps`` DDIM steps, CFG), ``student`` (one step, as distilled), ``adapter``
    (ImageRAGTurbo: the trained H-adapter and decoder LoRA, k neighbours, lambda = strength x
    the top-1 similarity, strength 1 by default) or ``slerp`` (the student with training-free
    slerp of the top-1 neighbour, target weight w = 1 - strength, strength 0.2 by default)."""
    from .model.clip_scorer import ClipScorer
    from .model.family import load_components, resolve

    if pipeline not in ("teacher", "student", "adapter", "slerp"):
        raise ValueError(f"unknown pipeline {pipeline!r}: teacher, student, adapter or slerp")
    comps = load_components(model, with_teacher=(pipeline == "teacher"),
                            retrieval_tuned=(pipeline == "adapter"))
    if pipeline == "adapter" and comps.h_adapter is None:
        raise FileNotFoundError(f"{model} has no trained h_adapter: run `imageragturbo train "
                                "adapter --install` first")
    scorer_dir = resolve(model) / "clip_scorer"
    if not scorer_dir.is_dir():
        raise FileNotFoundError(f"{scorer_dir} missing: FD and CLIP score need the model's "
                                "clip_scorer (trained by `imageragturbo train base`)")
    scorer = ClipScorer.from_pretrained(scorer_dir)
    items = sw.make_split("eval", n, seed)
    seeds = [seed * 1_000_000 + i for i in range(len(items))]
    prompts = [it.caption for it in items]
    if pipeline in ("adapter", "slerp"):
        from .quality import neighbours, student_images
        from .runtime.request import retrieval_controls

        if k < 1:
            raise ValueError(f"k must be >= 1 for the {pipeline} pipeline, got {k}")
        _, _, h, scores = neighbours(model, comps, prompts, k, index, progress)
        lam, w = retrieval_controls(scores, strength, has_adapter=pipeline == "adapter")
        images = student_images(comps, prompts, seeds, h if lam is not None else h[:, :1],
                                lam, slerp_w=w, desc=pipeline, progress=progress)
    else:
        images = generate(comps, prompts, seeds, pipeline, steps, guidance, progress=progress)
    # Real renders of other scenes of the same prompt distribution (the retrieval split's
    # first 2n), so FD compares distributions, not paired images.
    ref_items = sw.make_split("retrieval", max(2 * n, 200), seed)
    reference = np.stack([np.asarray(sw.render(it.scene)) for it in ref_items])
    out = measure(comps, scorer, items, images, reference)
    out.update({"pipeline": pipeline, "steps": steps,
                "guidance": guidance if pipeline == "teacher" else None, "model": model})
    if pipeline in ("adapter", "slerp"):
        out.update({"k": k if pipeline == "adapter" else 1, "strength": strength})
    if grid:
        caption_grid(images[:24], [it.caption for it in items[:24]], grid)
    return out


def compare_grid(model: str = DEFAULT_MODEL, n: int = 8, seed: int = 0,
                 path: str | Path = "outputs/compare.png", teacher_steps: int = 50,
                 guidance: float = 4.0, tile: int = 128) -> Path:
    """A PNG: one column per evaluation prompt, rows teacher x``teacher_steps``, teacher x1,
    student x1 (same seeds), the real render last; the prompt under each column."""
    from .model.family import load_components

    comps = load_components(model, with_teacher=True, retrieval_tuned=False)
    items = sw.make_split("eval", n, seed)
    prompts = [it.caption for it in items]
    seeds = [seed * 1_000_000 + i for i in range(n)]
    rows = {
        f"teacher x{teacher_steps}": generate(comps, prompts, seeds, "teacher", teacher_steps,
                                              guidance, progress=False),
        "teacher x1": generate(comps, prompts, seeds, "teacher", 1, guidance, progress=False),
        "student x1": generate(comps, prompts, seeds, "student", 1, progress=False),
        "render": np.stack([np.asarray(sw.render(it.scene)) for it in items]),
    }
    return row_grid(rows, prompts, path, tile=tile, label_w=90)
