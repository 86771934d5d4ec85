"""The retrieval database: build, save, load and query.

ImageRAGTurbo retrieves text-image pairs "in the text feature space of a pretrained CLIP text
encoder", reusing "the same CLIP text features used by the stable diffusion model" (paper,
Sec. 4.1, *Implementation details*). The paper searches a 0.63M-pair OpenImages database with
ScaNN; here the search is hnswlib (HNSW graph, inner product on L2-normalised vectors, so the
score is the cosine similarity that Eq. 5 uses as lambda).

The retrieved branch needs no UNet pass at request time: h_retr = f_enc(tau(p_retr), t=0,
z_0_retr) does not depend on the query, so :func:`build_index` computes it once per item and
stores it beside the item's VAE latent (see docs/design.md).

On disk an index is a folder::

    manifest.json        format, model identity, dims, count, hnswlib parameters, and the
                         size and sha256 of every file below (written last)
    index.hnsw           hnswlib graph over the text embeddings (space "ip")
    text.f16.npy         [N, D]          L2-normalised pooled text embeddings, fp16
    latents.f16.npy      [N, C, h, w]    VAE latents, fp16
    h.f16.npy            [N, C2, h2, w2] H-space features (UNet encoder at t=0), fp16
    items.jsonl          one {"id", "caption", "image"} per row, in row order

The arrays are ``.npy`` files opened as read-only memory maps, so a served index costs
page cache, not private memory, and many worker processes share one copy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from imageragturbo.checksums import sha256_file

FORMAT = "imageragturbo-retrieval-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FILES = {
    "index": "index.hnsw",
    "text": "text.f16.npy",
    "latents": "latents.f16.npy",
    "h": "h.f16.npy",
    "items": "items.jsonl",
}
ARRAYS = ("text", "latents", "h")

# hnswlib defaults, chosen with `imageragturbo bench retrieval` (clustered synthetic unit
# vectors, D=1024, 1000 held-out queries, 2 build threads, single-threaded queries; see
# retriever/bench.py). N=50,000: M=16/ef_construction=100 built in 15 s, and every ef from 32
# up gave recall@10 = 1.000 (p50 0.19 ms at ef=32, 0.33 ms at 64, 1.03 ms at 192); M=32
# doubled the build time and the latency for no recall. N=200,000: 49 s to build; ef=32
# recall@10 0.995 (p50 0.17 ms), ef=64 1.000 (p50 0.26 ms). ef=64 keeps a margin for
# N=630,000 (the paper's database size) well inside p50 <= 1 ms. Measured there (nice'd, on 2
# cores shared with a training job): build 349 s, 2.67 GB index, p50 0.41 ms, p99 0.74 ms,
# recall@1 0.990, recall@10 0.989 (exact faiss IndexFlatIP: p50 190 ms; ScaNN: p50 1.76 ms,
# recall@10 0.9996, build 178 s).
DEFAULT_M = 16
DEFAULT_EF_CONSTRUCTION = 100
DEFAULT_EF = 64


class IndexFormatError(ValueError):
    """An index folder that is incomplete, corrupt, or does not match the caller's model."""


@runtime_checkable
class RetrievalEncoder(Protocol):
    """What the index build needs from the pipeline's model (``imageragturbo.model``).

    ``model_id`` is recorded in the manifest; loading with a different one fails, because
    keys made by another text encoder live in another space. Arrays are float32:

    * ``encode_text(captions)`` -> [B, D], the pooled (EOS) text embedding, L2-normalised;
    * ``encode_images(images)`` -> [B, C, h, w], the VAE latents;
    * ``h_features(latents, captions)`` -> [B, C2, h2, w2], the UNet encoder's H-space output
      at t=0 for the clean latent, conditioned on the caption.
    """

    model_id: str
    text_dim: int

    def encode_text(self, captions: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list) -> np.ndarray: ...

    def h_features(self, latents: np.ndarray, captions: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class HNSWParams:
    """hnswlib parameters: ``M`` links per node, ``ef_construction`` (build beam), ``ef``
    (query beam; raised to k when k is larger)."""

    M: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef: int = DEFAULT_EF

    def __post_init__(self) -> None:
        for name in ("M", "ef_construction", "ef"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"hnswlib {name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- re-ranking

# Words that say nothing about an image's content (articles, joiners, caption wrappers).
STOPWORDS = frozenset(
    "a an the of and or with to in on at is are be there this that it its as well together "
    "showing shows picture image photo drawing".split())


def caption_terms(text: str) -> set[str]:
    """A text's content words and adjacent content-word pairs, lower-cased: pairs keep a
    binding ("red circle") that a bag of words loses ("red", "circle")."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def lexical_overlap(prompt: str, caption: str) -> float:
    """The share of the prompt's terms (:func:`caption_terms`) that the caption holds, in
    [0, 1]."""
    want = caption_terms(prompt)
    return len(want & caption_terms(caption)) / len(want) if want else 0.0


# --------------------------------------------------------------------------- serving


@dataclass
class Neighbours:
    """The k neighbours of B queries: row ``ids`` [B, k] and cosine ``scores`` [B, k], the
    items' ``item_ids`` and ``captions`` (B lists of k), and their cached ``latents``
    [B, k, C, h, w] and ``h`` [B, k, C2, h2, w2] as float32."""

    ids: np.ndarray
    scores: np.ndarray
    item_ids: list[list[str]]
    captions: list[list[str]]
    latents: np.ndarray
    h: np.ndarray
    images: list[list[str]] = field(default_factory=list)


class RetrievalIndex:
    """A loaded, read-only retrieval index: safe to query from many threads at once (hnswlib
    searches release the GIL and never write to the graph; the arrays are read-only memory
    maps; ``ef`` is fixed at load)."""

    def __init__(self, path: Path, manifest: dict, graph, arrays: dict[str, np.ndarray],
                 items: list[dict], threads: int) -> None:
        self.path = path
        self.manifest = manifest
        self._graph = graph
        self._arrays = arrays
        self._items = items
        self._threads = threads
        self.captions = [it["caption"] for it in items]
        self.item_ids = [it["id"] for it in items]
        self.images = [it["image"] for it in items]

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_id: str | None = None,
             text_dim: int | None = None, ef: int | None = None, verify: bool = True,
             threads: int = 1) -> RetrievalIndex:
        """Open the index folder at ``path`` after validating it against its manifest.

        Raises FileNotFoundError for a missing folder, manifest or file, and
        :class:`IndexFormatError` (a ValueError) for a truncated or altered file (size, and with
        ``verify`` the sha256 of every file), a wrong array shape or dtype, or a
        ``model_id`` / ``text_dim`` other than the index was built with. ``ef`` overrides the
        manifest's query beam; ``threads`` is hnswlib's per-call thread count (1 for serving,
        where concurrency comes from the callers).
        """
        import hnswlib

        given = Path(path)
        path = given.resolve()  # one version of the index, even if it is republished meanwhile
        if not path.is_dir():
            hint = ""
            if given.with_name(given.name + ".partial").exists():
                hint = (f" ({path.name}.partial is an interrupted build: run `imageragturbo "
                        "index build` again to resume it)")
            raise FileNotFoundError(f"no retrieval index at {given}{hint}")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{path} is not a complete retrieval index: no {MANIFEST} "
                                    "(it is written last, so the build did not finish)")
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as e:
            raise IndexFormatError(f"{mpath}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                or manifest.get("version") != FORMAT_VERSION:
            raise IndexFormatError(f"{mpath}: not a {FORMAT} v{FORMAT_VERSION} manifest")
        missing = {"model_id", "text_dim", "count", "shapes", "hnsw", "files"} - set(manifest)
        if missing:
            raise IndexFormatError(f"{mpath}: manifest lacks {sorted(missing)}")
        if model_id is not None and model_id != manifest["model_id"]:
            raise IndexFormatError(f"index {path} was built with model {manifest['model_id']!r}, "
                                   f"not {model_id!r}: its keys are in another text space; "
                                   "rebuild it with `imageragturbo index build --model ...`")
        dim, n = int(manifest["text_dim"]), int(manifest["count"])
        if text_dim is not None and int(text_dim) != dim:
            raise IndexFormatError(f"index {path} has text dim {dim}, the encoder gives "
                                   f"{text_dim}; rebuild the index for this model")
        for key in FILES:
            entry = manifest["files"].get(key)
            if entry is None:
                raise IndexFormatError(f"{mpath}: no entry for the {key} file")
            fpath = path / entry["name"]
            if not fpath.exists():
                raise FileNotFoundError(f"index {path} is missing {entry['name']}")
            size = fpath.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "larger than recorded"
                raise IndexFormatError(f"{fpath} is {what}: {size} bytes, the manifest says "
                                       f"{entry['bytes']}; rebuild the index")
            if verify and sha256_file(fpath) != entry["sha256"]:
                raise IndexFormatError(f"{fpath}: sha256 differs from the manifest (the file was "
                                       "altered or corrupted); rebuild the index")
        arrays = {}
        for key in ARRAYS:
            fpath = path / FILES[key]
            try:
                a = np.load(fpath, mmap_mode="r")
            except ValueError as e:
                raise IndexFormatError(f"{fpath}: not a readable .npy array ({e})") from None
            want = tuple(manifest["shapes"][key])
            if a.dtype != np.float16 or a.shape != want:
                raise IndexFormatError(f"{fpath}: {a.dtype} {a.shape}, the manifest says "
                                       f"float16 {want}")
            arrays[key] = a
        if arrays["text"].shape != (n, dim):
            raise IndexFormatError(f"{path}: text array {arrays['text'].shape} does not match "
                                   f"the manifest's count {n} and text dim {dim}")
        with open(path / FILES["items"]) as f:
            items = [json.loads(line) for line in f if line.strip()]
        if len(items) != n:
            raise IndexFormatError(f"{path}: {len(items)} items, the manifest says {n}")
        graph = hnswlib.Index(space="ip", dim=dim)
        try:
            graph.load_index(str(path / FILES["index"]), max_elements=n)
        except RuntimeError as e:
            raise IndexFormatError(f"{path / FILES['index']}: hnswlib cannot load it ({e})") from None
        if graph.get_current_count() != n:
            raise IndexFormatError(f"{path}: the graph holds {graph.get_current_count()} vectors, "
                                   f"the manifest says {n}")
        graph.set_ef(int(ef if ef is not None else manifest["hnsw"]["ef"]))
        graph.set_num_threads(threads)
        return cls(given, manifest, graph, arrays, items, threads)

    # ------------------------------------------------------------------ properties

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def text_dim(self) -> int:
        return int(self.manifest["text_dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    # ------------------------------------------------------------------ search

    def _queries(self, query_embeddings: np.ndarray) -> np.ndarray:
        q = np.asarray(query_embeddings, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]  # [D] -> [1, D]
        if q.ndim != 2 or q.shape[1] != self.text_dim:
            raise ValueError(f"query embeddings must be [B, {self.text_dim}], got {q.shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.isfinite(q).all() or (norms == 0).any():
            raise ValueError("query embeddings must be finite and non-zero")
        return np.ascontiguousarray(q / norms)

    def search(self, query_embeddings: np.ndarray, k: int, prompts: Sequence[str] | None = None,
               rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, len(self))`` nearest items of each query by cosine similarity.

        ``query_embeddings`` is [B, D] (or [D]), the pipeline's pooled text embeddings
        (normalised here if they are not). Returns ``ids`` [B, k'] int64 row numbers and
        ``scores`` [B, k'] float32 cosine similarities, best first.

        With ``prompts`` (B texts) and ``rerank`` > k: the dense top ``rerank`` re-ordered by
        cosine + the share of the prompt's words and word pairs found in the item's caption
        (:func:`lexical_overlap`), a hybrid dense + lexical retriever (the paper leaves the
        retriever open). ``scores`` stay the cosines, so lambda (Eq. 5) keeps its meaning.
        """
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if prompts is not None and int(rerank) > int(k):
            q = self._queries(query_embeddings)
            if len(prompts) != q.shape[0]:
                raise ValueError(f"{len(prompts)} prompts for {q.shape[0]} queries")
            cand, cos = self.search(q, int(rerank))                       # [B, N] dense
            k = min(int(k), cand.shape[1])
            lex = np.array([[lexical_overlap(p, self.captions[i]) for i in row]
                            for p, row in zip(prompts, cand)], np.float32).reshape(cos.shape)
            order = np.argsort(-(cos + lex), axis=1, kind="stable")[:, :k]
            return (np.take_along_axis(cand, order, axis=1),
                    np.take_along_axis(cos, order, axis=1))
        q = self._queries(query_embeddings)
        k = min(int(k), len(self))
        try:
            labels, dist = self._graph.knn_query(q, k=k, num_threads=self._threads)
        except RuntimeError:
            # hnswlib cannot always return k results from a small or sparse graph; the
            # stored keys give the exact answer instead.
            return self.exact_search(q, k)
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    def exact_search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force search over the stored fp16 keys (the reference for recall)."""
        q = self._queries(query_embeddings)
        k = min(int(k), len(self))
        keys = self._arrays["text"]
        scores = np.empty((q.shape[0], len(self)), dtype=np.float32)  # [B, N]
        step = 65536
        for s in range(0, len(self), step):
            block = np.asarray(keys[s:s + step], dtype=np.float32)  # [n, D]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            scores[:, s:s + step] = q @ block.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [B, k], unordered
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return (np.take_along_axis(top, order, axis=1).astype(np.int64),
                np.take_along_axis(top_scores, order, axis=1))

    # ------------------------------------------------------------------ cached tensors

    def _rows(self, key: str, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        a = self._arrays[key]
        # Read each distinct row once, in file order (np.unique sorts), then scatter.
        rows, inverse = np.unique(ids.ravel(), return_inverse=True)
        flat = np.asarray(a[rows], dtype=np.float32)  # [U, *row shape]
        return flat[inverse].reshape(*ids.shape, *a.shape[1:])  # [*ids.shape, *row shape]

    def h(self, ids: np.ndarray) -> np.ndarray:
        """Cached H-space features of rows ``ids`` ([B, k] -> [B, k, C2, h2, w2], float32)."""
        return self._rows("h", ids)

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """Cached VAE latents of rows ``ids`` ([B, k] -> [B, k, C, h, w], float32)."""
        return self._rows("latents", ids)

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored keys of rows ``ids`` ([B, k] -> [B, k, D], float32)."""
        return self._rows("text", ids)

    def lookup(self, ids: np.ndarray, scores: np.ndarray) -> Neighbours:
        """Everything cached for the rows ``ids`` [B, k] that :meth:`search` returned."""
        ids = np.asarray(ids, dtype=np.int64)
        return Neighbours(
            ids=ids, scores=np.asarray(scores, dtype=np.float32),
            item_ids=[[self.item_ids[i] for i in row] for row in ids],
            captions=[[self.captions[i] for i in row] for row in ids],
            latents=self.latents(ids), h=self.h(ids),
            images=[[self._items[i]["image"] for i in row] for row in ids])

    def query(self, prompts: Sequence[str], encoder: RetrievalEncoder, k: int) -> Neighbours:
        """Encode ``prompts`` with ``encoder`` (checked against the manifest) and return
        their k neighbours with the cached tensors."""
        if str(encoder.model_id) != self.model_id:
            raise IndexFormatError(f"index {self.path} was built with model {self.model_id!r}, "
                                   f"the encoder is {encoder.model_id!r}")
        ids, scores = self.search(encoder.encode_text(list(prompts)), k)
        return self.lookup(ids, scores)
