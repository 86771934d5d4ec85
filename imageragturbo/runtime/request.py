"""The numeric steps of a request around the five ONNX stages, in NumPy (no torch), shared by
the in-process ``OnnxPipeline`` and the Triton ensemble's Python backends, so both compute the
same thing:

- ``initial_noise``: z_T for a seed (the PyTorch pipeline draws it here too, so every backend
  starts from the very same z_T);
- ``retrieval_controls``: lambda of the H-adapter (paper Eq. 5) or the slerp weight (Eq. 3)
  from the neighbours' scores and the user's strength;
- ``slerp_inject``: the training-free injection of paper Eq. 3;
- ``to_uint8``: the VAE decoder's [-1, 1] output to uint8 pixels;
- ``load_index`` / ``retrieve``: open a retrieval index checked against the model, and look up
  the neighbours' cached H-space features;
- ``neighbour_start``: a neighbour-start model's start, the top-1 neighbour's latent noised;
- ``retrieve_and_generate``: retrieve, then one step with the retrieval inputs a model takes,
  as every in-process runner (``generate``, the latency bench, the tests) does it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.client.contract import check_h_shape
from imageragturbo.defaults import RERANK_CANDIDATES, from_unit


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """z_T for each seed: (B, C, H, W) float32 standard normal, from NumPy's PCG64."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32)
                     for s in seeds])


def slerp_inject(h_tgt: np.ndarray, h_retr: np.ndarray, w, eps: float = 1e-4) -> np.ndarray:
    """Paper Eq. 3 in NumPy, the same computation as ``model.h_space.slerp_inject``: slerp
    over each sample's flattened C*H*W vector, the retrieved feature first rescaled to the
    target's norm, target weight ``w`` (scalar or (B,)); lerp where sin(angle) < eps."""
    if h_tgt.shape != h_retr.shape:
        raise ValueError(f"h_tgt {h_tgt.shape} and h_retr {h_retr.shape} differ")
    a = h_tgt.astype(np.float32).reshape(len(h_tgt), -1)               # (B, N)
    b = h_retr.astype(np.float32).reshape(len(h_retr), -1)             # (B, N)
    na = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)   # (B, 1)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12) * na
    w = np.asarray(w, dtype=np.float32).reshape(-1, 1)                 # (B|1, 1)
    cos = np.clip((a * b).sum(1, keepdims=True) / (na * na), -1.0, 1.0)
    omega = np.arccos(cos)
    so = np.sin(omega)
    small = np.abs(so) < eps
    safe = np.where(small, 1.0, so)
    slerp = (np.sin((1 - w) * omega) / safe) * b + (np.sin(w * omega) / safe) * a
    lerp = (1 - w) * b + w * a
    return np.where(small, lerp, slerp).reshape(h_tgt.shape).astype(h_tgt.dtype)


def neighbour_start(index, top1: np.ndarray, z_t: np.ndarray, start: dict) -> np.ndarray:
    """Where a neighbour-start model's one step begins (beyond the paper; ``train adapter
    --neighbour-init``): the top-1 neighbours' latents (rows ``top1`` (B,) of the index) noised
    with z_T to the model's start timestep, sqrt(a) latent + sqrt(1 - a) z_T in float32 with
    a = ``start["alpha_bar"]``. Reads one latent row per request, the only one it uses."""
    return start_from(index.latents(np.asarray(top1, np.int64).reshape(-1)), z_t, start)


def served_pool(pool: int | None, start: dict | None) -> int:
    """The neighbour pool a request draws from: the one asked for, else the model's (the
    ``start_pool`` a neighbour-start model was trained with, in its ``neighbour_start``), else
    1 (the top k, best first)."""
    if pool is not None:
        return int(pool)
    return int((start or {}).get("pool", 1))


def retrieve_and_generate(generate, pooled_of, index, prompts: Sequence[str],
                          seeds: Sequence[int], k: int, *, has_adapter: bool,
                          start: dict | None, strength: float | None = None,
                          rerank: int = RERANK_CANDIDATES, pool: int = 1):
    """A request in process with k >= 1 neighbours, as the served ensemble computes it:
    ``retrieve`` (re-ranked by the prompts' words; drawn from the top k x ``pool`` by the
    seeds), ``retrieval_controls``, and for a neighbour-start model (``start``, its trained
    adapter only) the first neighbour's clean latent as ``z_init``; then
    ``generate(prompts, seeds, h_retr=, lam=, slerp_w=, z_init=)`` (``OnnxPipeline.generate``,
    ``TorchStudent.generate``). ``pooled_of(prompts)``: the prompts' pooled text keys.
    Returns (images, Neighbours, lam, slerp_w)."""
    h_retr, scores, nb = retrieve(index, pooled_of(prompts), k, prompts, rerank, seeds, pool)
    lam, w = retrieval_controls(scores, strength, has_adapter)
    z_init = (index.latents(np.asarray(nb.ids)[:, 0]).astype(np.float32)
              if start and lam is not None else None)
    images = generate(prompts, seeds, h_retr=h_retr, lam=lam, slerp_w=w, z_init=z_init)
    return images, nb, lam, w


def start_from(latents: np.ndarray, z_t: np.ndarray, start: dict) -> np.ndarray:
    """``latents`` (B, C, h, w) noised with z_T as ``neighbour_start`` does."""
    lat = np.asarray(latents, np.float32)
    if lat.shape != z_t.shape:
        raise ValueError(f"the neighbours' latents {lat.shape} do not fit z_T {z_t.shape}: "
                         "the index must be built with this model")
    a = float(start["alpha_bar"])
    return np.float32(np.sqrt(a)) * lat + np.float32(np.sqrt(1.0 - a)) * z_t.astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), as ``decode_latents``."""
    x = np.round(from_unit(np.clip(image.astype(np.float32), -1, 1))).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)                                     # (B, H, W, 3)


def load_index(path: str | Path, text_dim: int, h_shape: Sequence[int], ef: int | None = None,
               verify: bool = False):
    """Open a retrieval index (``imageragturbo.retriever``) and check it fits this model: the
    same text width, and cached H-space features of the UNet encoder's h shape. The index's
    structure is checked, its arrays memory-mapped, not read; ``verify`` adds the sha256 of
    every file (``RetrievalIndex.load``)."""
    from imageragturbo.retriever.index import RetrievalIndex

    index = RetrievalIndex.load(path, text_dim=text_dim, ef=ef, verify=verify)
    check_h_shape(index.manifest["shapes"]["h"][1:], h_shape, path)
    return index


def sample_neighbours(ids: np.ndarray, scores: np.ndarray, k: int, seeds: Sequence[int]):
    """Each row's k neighbours drawn without replacement from its candidates (B, n >= k) by a
    generator seeded with the row's noise seed, best-first order kept: different seeds see
    different neighbours (so a model that follows its neighbours still varies with the seed),
    the same seed always the same ones."""
    if len(seeds) != len(ids):
        raise ValueError(f"{len(seeds)} seeds for {len(ids)} queries")
    k = min(k, ids.shape[1])
    pick = np.stack([np.sort(np.random.default_rng([int(s), 7]).choice(ids.shape[1], k,
                                                                        replace=False))
                     for s in seeds])                                            # (B, k)
    return np.take_along_axis(ids, pick, axis=1), np.take_along_axis(scores, pick, axis=1)


def retrieve(index, pooled: np.ndarray, k: int, prompts: Sequence[str] | None = None,
             rerank: int = RERANK_CANDIDATES, seeds: Sequence[int] | None = None,
             pool: int = 1):
    """Neighbours of each query: (h_retr (B, k, C, h', w'), scores (B, k), Neighbours). With
    the ``prompts``, the dense top ``rerank`` are re-ranked by their words
    (``RetrievalIndex.search``). With ``seeds`` and ``pool`` > 1, the k are drawn from the top
    k * pool by each query's seed (``sample_neighbours``). The served retriever does the same.
    Reads the k rows of h per query and nothing else of the index's arrays: the Neighbours
    carry no latents (no output of the request path uses them)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    sampled = seeds is not None and pool > 1
    ids, scores = index.search(pooled, k * pool if sampled else k, prompts=prompts,
                               rerank=rerank)
    if sampled:
        ids, scores = sample_neighbours(ids, scores, k, seeds)
    nb = index.lookup(ids, scores, latents=False)
    return nb.h.astype(np.float32), nb.scores, nb


def retrieval_controls(scores: np.ndarray, strength: float | None, has_adapter: bool):
    """(lam, slerp_w) from the neighbours' scores and the user's ``strength``.

    With an H-adapter: lam = strength x the top-1 cosine similarity (paper Eq. 5 sets lambda to
    that similarity: strength 1, the default). Without one: training-free slerp of the top-1
    neighbour (paper Eq. 3) with target weight w = 1 - strength (default strength 0.2, the
    paper's fixed w = 0.8)."""
    if has_adapter:
        s = 1.0 if strength is None else float(strength)
        if s < 0:
            raise ValueError(f"strength must be >= 0, got {s}")
        return (s * scores[:, 0]).astype(np.float32), None
    s = 0.2 if strength is None else float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"slerp strength must be in [0, 1], got {s}")
    return None, 1.0 - s
