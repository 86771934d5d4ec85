"""Statistics for the benchmarks (pure NumPy): paired bootstrap intervals over prompts, the
same per prompt class, how far apart a prompt's images lie across noise seeds (``bench
quality``), and latency percentiles (``bench quality``, ``bench serve``, ``bench soak``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs`` (NumPy's linear interpolation)."""
    return float(np.percentile(np.asarray(xs), q))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n: int = RESAMPLES,
                     seed: int = 0, level: float = LEVEL) -> dict:
    """The mean of a - b over paired items (prompts) and its percentile bootstrap interval:
    ``n`` resamples of the items with replacement, a fixed RNG ``seed``. Returns
    ``{"diff", "lo", "hi"}`` (NaN for no items)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got {a.shape} "
                         f"and {b.shape}")
    if not len(a):
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan")}
    d = a - b
    means = d[np.random.default_rng(seed).integers(0, len(d), (n, len(d)))].mean(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def split_intervals(a: Sequence[float], b: Sequence[float], classes: Sequence[str],
                    splits: Sequence[str], seed: int = 0) -> dict:
    """``paired_bootstrap`` over all items ("all") and within each class of ``splits``
    (items whose ``classes`` entry is that class; a class without items is left out)."""
    a, b, classes = np.asarray(a), np.asarray(b), np.asarray(classes)
    out = {"all": paired_bootstrap(a, b, seed=seed)}
    for s in splits:
        m = classes == s
        if m.any():
            out[s] = paired_bootstrap(a[m], b[m], seed=seed)
    return out


def seed_spread(x: np.ndarray) -> np.ndarray:
    """(S, N, D) features of N prompts' images under S seeds -> (N,): per prompt the mean
    over its seed pairs of 1 - cosine similarity (NaN with one seed)."""
    x = np.asarray(x, np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return _mean_over_pairs(lambda i, j: 1.0 - (u[i] * u[j]).sum(-1), len(x), x.shape[1])


def pixel_spread(images: np.ndarray) -> np.ndarray:
    """(S, N, H, W, C) uint8 images -> (N,): per prompt the mean over its seed pairs of the
    per-pixel RMS distance with values in [0, 1] (NaN with one seed)."""
    x = np.asarray(images, np.float32) / 255.0
    s, n = x.shape[:2]
    x = x.reshape(s, n, -1)
    return _mean_over_pairs(lambda i, j: np.sqrt(((x[i] - x[j]) ** 2).mean(-1)), s, n)


def _mean_over_pairs(dist, s: int, n: int) -> np.ndarray:
    pairs = [(i, j) for i in range(s) for j in range(i + 1, s)]
    if not pairs:
        return np.full(n, np.nan)
    return np.mean([dist(i, j) for i, j in pairs], axis=0)
