"""``imageragturbo eval run``: generate the evaluation prompts with a pipeline and measure them.

Metrics (the paper's Tables 1-2 for ShapesWorld): ShapesTIFA (overall and per category), the
Frechet distance between generated images and real renders in the CLIP-score analogue's
image-feature space (FID's analogue), and the CLIP-score analogue (mean cosine similarity of
each image with its prompt).

What ``bench quality`` (``quality``, which imports this module and never the other way) shares
with it lives here once: ``generate``, the one generator loop (teacher or student, with the
retrieval options), the noise-seed rule (``noise_seeds``), the FD reference renders
(``fd_reference``), the scorer and adapter checks, and the neighbours as served
(``neighbours``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.defaults import DEFAULT_MODEL, RERANK_CANDIDATES

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


SEED_STRIDE = 100_000    # seed j of prompt i: seed * 1_000_000 + i + j * SEED_STRIDE
BATCH = {"teacher": 50, "student": 100}   # prompts a batch (the teacher's CFG doubles its own)


def noise_seeds(seed: int, n: int, seeds: int = 1) -> np.ndarray:
    """(S, N) noise seeds of the first ``n`` evaluation prompts under ``seeds`` noise seeds:
    seed j of prompt i is seed * 1e6 + i + j * 1e5 (row 0: the one-seed rule of ``eval run``)."""
    if n > SEED_STRIDE:
        raise ValueError(f"at most {SEED_STRIDE} prompts (the seed grid's stride), got {n}")
    return (seed * 1_000_000 + np.arange(n)[None] + SEED_STRIDE * np.arange(seeds)[:, None])


def generate(components, prompts: Sequence[str], seeds: Sequence[int], pipeline: str = "student",
             steps: int = 1, guidance: float = 4.0, *, h_retr: np.ndarray | None = None,
             lam: np.ndarray | None = None, slerp_w: float | None = None,
             retrieval_guidance: float | None = None, batch: int | None = None,
             desc: str | None = None, progress: bool = True,
             z_init: np.ndarray | None = None, t_init: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3) for the prompts, ``batch`` at a time (``BATCH`` by default):
    the teacher (``steps`` DDIM steps, classifier-free ``guidance``) or the one-step student.

    The student's retrieval, as ``pipeline.student_generate`` takes it: ``h_retr``
    (N, k, C, h, w) float32 through the model's H-adapter with ``lam`` (N,), and through its
    decoder neighbour attention when the components have one; or slerp of the top-1 neighbour
    at target weight ``slerp_w`` (paper Eq. 3). ``retrieval_guidance`` s (an extension, not the
    paper's; two decoder passes): z0 = z0_off + s (z0_on - z0_off), z0_off the same weights
    without the retrieved features (K = 0). ``z_init`` (N, C, h, w) and ``t_init``: a
    ``neighbour_init`` model's start, the top-1 neighbour's latent noised to t_init (beyond
    the paper; ``pipeline.student_generate``)."""
    import torch
    from tqdm import tqdm

    from .model.pipeline import decode_latents, student_generate, teacher_generate

    if pipeline not in BATCH:
        raise ValueError(f"unknown pipeline {pipeline!r}: teacher or student")
    if pipeline == "teacher" and (h_retr is not None or slerp_w is not None):
        raise ValueError("the teacher takes no retrieved features")
    if pipeline == "student" and steps != 1:
        raise ValueError("the student is a one-step model: use --steps 1")
    if retrieval_guidance is not None and h_retr is None:
        raise ValueError("retrieval guidance needs retrieved features (h_retr)")

    def one(sl: slice) -> np.ndarray:
        p, s = list(prompts[sl]), list(seeds[sl])
        if pipeline == "teacher":
            return teacher_generate(components, p, s, steps=steps, guidance=guidance)
        hr = None if h_retr is None else torch.from_numpy(h_retr[sl])
        lm = None if lam is None else torch.from_numpy(lam[sl])
        if z_init is not None:
            if retrieval_guidance is not None:
                raise ValueError("retrieval guidance with a neighbour start is not defined")
            return student_generate(components, p, s, h_retr=hr, lam=lm, slerp_w=slerp_w,
                                    z_init=torch.from_numpy(z_init[sl]), t_init=t_init)
        if retrieval_guidance is None:
            return student_generate(components, p, s, h_retr=hr, lam=lm, slerp_w=slerp_w)
        _, on = student_generate(components, p, s, h_retr=hr, lam=lm, slerp_w=slerp_w,
                                 return_latents=True)
        _, off = student_generate(components, p, s, return_latents=True)
        return decode_latents(components, off + retrieval_guidance * (on - off))

    batch = batch or BATCH[pipeline]
    return np.concatenate([one(slice(a, a + batch)) for a in
                           tqdm(range(0, len(prompts), batch), disable=not progress,
                                desc=desc or f"{pipeline} x{steps}")])


def fd_reference(n: int, seed: int = 0) -> np.ndarray:
    """The Frechet distance's real images for ``n`` evaluation prompts: renders of other scenes
    of the same prompt distribution (the retrieval split's first max(2n, 200)), so FD compares
    distributions, not paired images. uint8 (M, H, W, 3)."""
    ref_items = sw.make_split("retrieval", max(2 * n, 200), seed)
    return np.stack([np.asarray(sw.render(it.scene)) for it in ref_items])


def load_scorer(model: str | Path):
    """The model's CLIP-score analogue (``clip_scorer/``), which FD and CLIP score need."""
    from .model.clip_scorer import ClipScorer
    from .model.family import resolve

    scorer_dir = resolve(model) / "clip_scorer"
    if not scorer_dir.is_dir():
        raise FileNotFoundError(f"{scorer_dir} missing: FD and CLIP score need the model's "
                                "clip_scorer (trained by `imageragturbo train base`)")
    return ClipScorer.from_pretrained(scorer_dir)


def require_adapter(components, model: str | Path) -> None:
    """Refuse components without the trained H-adapter (the ImageRAGTurbo rows need it)."""
    if components.h_adapter is None:
        raise FileNotFoundError(f"{model} has no trained h_adapter: run `imageragturbo train "
                                "adapter --install` first")


def prompt_embeddings(c, prompts: Sequence[str]) -> np.ndarray:
    """The pooled (retrieval) text embeddings of the prompts, (N, D)."""
    import torch

    from .model.pipeline import encode_prompt

    with torch.no_grad():
        return np.concatenate([encode_prompt(c, list(prompts[a:a + 256]))[1].numpy()
                               for a in range(0, len(prompts), 256)])


def neighbours(model: str, c, prompts: Sequence[str], k: int, index=None, progress=True,
               rerank: int = RERANK_CANDIDATES):
    """The index (``index`` or the model's default, built when missing), and each prompt's k
    neighbours as served (the dense top ``rerank`` re-ranked by the prompt's words; 0: dense
    only): their cached H features (N, k, C, h, w) float32 and scores (N, k)."""
    from .model import load_retrieval_encoder
    from .retriever import RetrievalIndex
    from .retriever.ensure import ensure_index

    idx = RetrievalIndex.load(ensure_index(model, Path(index) if index else None,
                                           quiet=not progress,
                                           load_encoder=load_retrieval_encoder))
    ids, scores = idx.search(prompt_embeddings(c, prompts), k, prompts=list(prompts),
                             rerank=rerank)
    return idx, ids, idx.h(ids).astype(np.float32), scores.astype(np.float32)


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
    from .model.family import load_components

    if pipeline not in ("teacher", "student", "adapter", "slerp"):
        raise ValueError(f"unknown pipeline {pipeline!r}: teacher, student, adapter or slerp")
    comps = load_components(model, with_teacher=(pipeline == "teacher"),
                            retrieval_tuned=(pipeline == "adapter"))
    if pipeline == "adapter":
        require_adapter(comps, model)
    scorer = load_scorer(model)
    items = sw.make_split("eval", n, seed)
    seeds = noise_seeds(seed, len(items))[0].tolist()
    prompts = [it.caption for it in items]
    if pipeline in ("adapter", "slerp"):
        from .runtime.request import retrieval_controls

        if k < 1:
            raise ValueError(f"k must be >= 1 for the {pipeline} pipeline, got {k}")
        idx, ids, h, scores = neighbours(model, comps, prompts, k, index, progress)
        lam, w = retrieval_controls(scores, strength, has_adapter=pipeline == "adapter")
        start = ({"z_init": idx.latents(ids[:, 0]).astype(np.float32),
                  "t_init": comps.neighbour_start["timestep"]}
                 if pipeline == "adapter" and comps.neighbour_start else {})
        images = generate(comps, prompts, seeds, h_retr=h if lam is not None else h[:, :1],
                          lam=lam, slerp_w=w, desc=pipeline, progress=progress, **start)
    else:
        # 50 a batch, as eval run has always generated these: the batch size can move a pixel
        # by one level through float rounding, so its images stay what they were
        images = generate(comps, prompts, seeds, pipeline, steps, guidance, batch=50,
                          progress=progress)
    reference = fd_reference(n, seed)
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
    seeds = noise_seeds(seed, n)[0].tolist()
    rows = {
        f"teacher x{teacher_steps}": generate(comps, prompts, seeds, "teacher", teacher_steps,
                                              guidance, progress=False),
        "teacher x1": generate(comps, prompts, seeds, "teacher", 1, guidance, progress=False),
        "student x1": generate(comps, prompts, seeds, "student", 1, progress=False),
        "render": np.stack([np.asarray(sw.render(it.scene)) for it in items]),
    }
    return row_grid(rows, prompts, path, tile=tile, label_w=90)
