"""Retrieval benchmark: hnswlib against exact search (and ScaNN, the paper's choice, when it is
importable), on synthetic clustered vectors, measured in one run.

The paper retrieves from 0.63M OpenImages pairs with ScaNN in the CLIP text feature space
(Sec. 4.1, *Implementation details*) and reports 1.9 ms of retrieval per image (Sec. 4.4).
``imageragturbo bench retrieval --n 630000 --dim 1024`` reproduces that database size at the
OpenCLIP ViT-H/14 text width.

Data (:func:`clustered_vectors`): uniform noise on the sphere is a poor stand-in for text
embeddings (in high dimension all its points are nearly equidistant, which no index handles
well and no real data looks like). Instead: ``clusters`` Gaussian centres in an
``intrinsic_dim``-dimensional space, points scattered around them (``spread``), mapped into D
dimensions by a random orthonormal map, plus isotropic noise carrying ``noise`` of the
energy, then L2-normalised. Queries are fresh draws from the same mixture (not database
points), as prompts are not captions of the database.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from .index import DEFAULT_EF, DEFAULT_EF_CONSTRUCTION, DEFAULT_M

DATA_DEFAULTS = {"clusters": 1024, "intrinsic_dim": 64, "spread": 0.6, "noise": 0.1}


def clustered_vectors(n: int, dim: int, *, clusters: int = 1024, intrinsic_dim: int = 64,
                      spread: float = 0.6, noise: float = 0.1, seed: int = 0,
                      stream: int = 0) -> np.ndarray:
    """[n, dim] float32 unit vectors from the Gaussian mixture described in the module
    docstring. ``seed`` fixes the mixture (centres and map); ``stream`` picks independent
    draws from it (0 for the database, 1 for queries)."""
    if n < 1 or dim < 2:
        raise ValueError(f"need n >= 1 and dim >= 2, got n={n}, dim={dim}")
    r = min(intrinsic_dim, dim)
    world = np.random.default_rng([seed, 0])
    centres = world.standard_normal((clusters, r)).astype(np.float32)  # [clusters, r]
    basis, _ = np.linalg.qr(world.standard_normal((dim, r)))  # [dim, r], orthonormal columns
    basis = basis.T.astype(np.float32)  # [r, dim]
    rng = np.random.default_rng([seed, 1, stream])
    out = np.empty((n, dim), dtype=np.float32)
    step = 32768
    for s in range(0, n, step):
        m = min(n, s + step) - s
        z = centres[rng.integers(0, clusters, m)]
        z += spread * rng.standard_normal((m, r), dtype=np.float32)  # [m, r]
        x = z @ basis  # [m, r] @ [r, dim] -> [m, dim]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= np.sqrt(1.0 - noise)
        iso = rng.standard_normal((m, dim), dtype=np.float32)
        iso *= np.sqrt(noise) / np.linalg.norm(iso, axis=1, keepdims=True)
        x += iso
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out


def exact_topk(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] row ids of the exact inner-product top k (batched BLAS; the ground truth)."""
    k = min(k, db.shape[0])
    best_s = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((queries.shape[0], 0), dtype=np.int64)
    step = 131072
    for s in range(0, db.shape[0], step):
        sc = queries @ db[s:s + step].T  # [Q, n]
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + s], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top k found among the returned top k."""
    f, t = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(f, t))
    return hits / (t.shape[0] * t.shape[1])


def _latency(fn, queries: np.ndarray, warmup: int = 20) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Time ``fn(q[None])`` per query (one query a call, as served). Returns the top-k ids
    [Q, k], and p50, p99 in ms."""
    for q in queries[:warmup]:
        fn(q[None])
    ids, times = [], []
    for q in queries:
        t = time.perf_counter()
        r = fn(q[None])
        times.append(time.perf_counter() - t)
        ids.append(np.asarray(r).reshape(-1))
    ms = np.array(times) * 1e3
    return np.stack(ids), ms, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_retrieval_bench(n: int, dim: int, *, queries: int = 1000, exact_queries: int = 100,
                        k: int = 10, M: int = DEFAULT_M,
                        ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef: int = DEFAULT_EF,
                        threads: int | None = None, seed: int = 0, scann: bool = True,
                        data: dict | None = None, progress: bool = True) -> dict:
    """Build and query hnswlib, exact search (faiss ``IndexFlatIP`` if importable, else
    numpy) and ScaNN (if importable) on the same vectors; return their figures.

    Latency is per single query, single-threaded (hnswlib ``num_threads=1``, faiss
    ``omp_set_num_threads(1)``; numpy's matrix-vector product runs on whatever BLAS threads
    it has, said in the result). Builds use ``threads`` (default: all CPUs). Recall@1 and
    recall@10 are against the exact top k of the same ``queries`` held-out vectors; exact
    search is timed on the first ``exact_queries`` of them (it is slow by design).
    """
    if k < 10:
        raise ValueError("k must be >= 10 (recall@10 is reported)")
    data = {**DATA_DEFAULTS, **(data or {})}
    threads = threads or os.cpu_count() or 1
    t = time.perf_counter()
    db = clustered_vectors(n, dim, seed=seed, stream=0, **data)
    qs = clustered_vectors(queries, dim, seed=seed, stream=1, **data)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    truth = exact_topk(db, qs, k)
    truth_s = time.perf_counter() - t
    result: dict = {
        "n": n, "dim": dim, "k": k, "queries": queries, "seed": seed,
        "data": {"kind": "gaussian mixture on a low-dim subspace + isotropic noise, "
                         "L2-normalised", **data, "generate_seconds": round(gen_s, 2),
                 "ground_truth_seconds": round(truth_s, 2)},
        "build_threads": threads, "query_threads": 1,
    }

    result["hnsw"] = _bench_hnsw(db, qs, truth, k, M, ef_construction, ef, threads, progress)
    gc.collect()

    # exact
    eq = qs[:exact_queries]
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(db)
        build_s = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        found, _, p50, p99 = _latency(lambda q: flat.search(q, k)[1], eq, warmup=3)
        method, nbytes, qthreads = f"faiss {faiss.__version__} IndexFlatIP", flat.ntotal * dim * 4, 1
        faiss.omp_set_num_threads(threads)
        del flat
    else:
        def numpy_search(q):
            sc = db @ q[0]  # [N, D] @ [D] -> [N]
            top = np.argpartition(-sc, k - 1)[:k]
            return top[np.argsort(-sc[top])]
        build_s = 0.0
        found, _, p50, p99 = _latency(numpy_search, eq, warmup=3)
        method, nbytes, qthreads = "numpy (BLAS gemv)", db.nbytes, "BLAS default"
    result["exact"] = {
        "method": method, "build_seconds": round(build_s, 2), "index_bytes": int(nbytes),
        "p50_ms": round(p50, 4), "p99_ms": round(p99, 4), "timed_queries": len(eq),
        "query_threads": qthreads,
        "recall@1": round(recall(found, truth[:len(eq)], 1), 4),
        "recall@10": round(recall(found, truth[:len(eq)], 10), 4),
    }
    gc.collect()

    if scann:
        try:
            import scann as scann_mod
        except ImportError:
            scann_mod = None
        if scann_mod is not None:
            result["scann"] = _bench_scann(scann_mod, db, qs, truth, k)
            gc.collect()
    result["peak_rss_bytes"] = _peak_rss()
    return result


def _bench_hnsw(db: np.ndarray, qs: np.ndarray, truth: np.ndarray, k: int, M: int,
                ef_construction: int, ef: int, threads: int, progress: bool) -> dict:
    import hnswlib
    from tqdm import tqdm

    n, dim = db.shape
    graph = hnswlib.Index(space="ip", dim=dim)
    graph.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=100)
    t = time.perf_counter()
    step = 20000
    with tqdm(total=n, desc="hnsw build", unit="vec", disable=not progress) as bar:
        for s in range(0, n, step):
            graph.add_items(db[s:s + step], np.arange(s, min(n, s + step)), num_threads=threads)
            bar.update(min(n, s + step) - s)
    build_s = time.perf_counter() - t
    graph.set_ef(ef)
    rss_after_build = _peak_rss()
    found, _, p50, p99 = _latency(lambda q: graph.knn_query(q, k=k, num_threads=1)[0], qs)
    return {
        "M": M, "ef_construction": ef_construction, "ef": ef,
        "build_seconds": round(build_s, 2), "index_bytes": int(graph.index_file_size()),
        "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
        "recall@1": round(recall(found, truth, 1), 4),
        "recall@10": round(recall(found, truth, 10), 4),
        "peak_rss_bytes_after_build": rss_after_build,
    }


def _bench_scann(scann_mod, db: np.ndarray, qs: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """ScaNN with the settings its README recommends for ~1M points: a k-means tree of
    sqrt(N) leaves searching 5 % of them, anisotropic quantisation (2 dims per 4-bit code,
    threshold 0.2), exact re-ordering of the best 100."""
    n = db.shape[0]
    leaves = max(1, int(round(np.sqrt(n))))
    search = max(1, leaves // 20)
    t = time.perf_counter()
    searcher = (scann_mod.scann_ops_pybind.builder(db, k, "dot_product")
                .tree(num_leaves=leaves, num_leaves_to_search=search,
                      training_sample_size=min(n, 250_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(100).build())
    build_s = time.perf_counter() - t
    tmp = tempfile.mkdtemp(prefix="irt-scann-")
    try:
        searcher.serialize(tmp)
        nbytes = _dir_bytes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found, _, p50, p99 = _latency(
        lambda q: searcher.search(q[0], final_num_neighbors=k)[0], qs)
    return {"num_leaves": leaves, "num_leaves_to_search": search, "reorder": 100,
            "build_seconds": round(build_s, 2), "index_bytes": int(nbytes),
            "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
            "recall@1": round(recall(found, truth, 1), 4),
            "recall@10": round(recall(found, truth, 10), 4)}
