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

Integrity is checked where it is cheap for the size: :meth:`RetrievalIndex.load` checks the
structure (format version, every file's size, the arrays' headers: dtype, shape, count, and
that each file holds exactly its header and data) and reads no array data, so a 124 GB index
(the paper's 0.63M items) opens in the time its graph and item list take. The sha256 of every
file is checked by :func:`verify_index` (``imageragturbo index verify``; ``load(verify=True)``)
and wherever an index is published or copied (``build.publish``, ``build.copy_index``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import time
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


# Arrays read a few rows at a time at request time (``lookup``): their maps get no
# speculative readahead, and each row is prefetched in one request instead. Measured on this
# machine's disk (cold cache, 8 random rows of 1280x8x8 fp16 from an 8,000-row file): with
# the kernel's default readahead 16,388 pages (64 MiB) were read in 50 ms; with MADV_RANDOM
# and MADV_WILLNEED on the rows, 332 pages (the 8 rows) in 2-3 ms.
RANDOM_ACCESS = ("latents", "h")


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


# --------------------------------------------------------------------------- checks


def read_manifest(path: str | os.PathLike) -> tuple[Path, dict]:
    """The index folder at ``path``, resolved (a published index is a symlink to one version),
    and its manifest, checked for the format, version and the fields the checks below use."""
    given = Path(path)
    path = given.resolve()
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
    for key in FILES:
        entry = manifest["files"].get(key)
        if not isinstance(entry, dict) or not {"name", "bytes", "sha256"} <= set(entry):
            raise IndexFormatError(f"{mpath}: no name, size and sha256 for the {key} file")
    for key in ARRAYS:
        if key not in manifest["shapes"]:
            raise IndexFormatError(f"{mpath}: no shape for the {key} array")
    return path, manifest


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap, int]:
    """A read-only memory map of the ``.npy`` file at ``path`` (what ``np.load(path,
    mmap_mode="r")`` gives, keeping the map itself so that its access pattern can be advised),
    after checking that the file holds exactly its header and the data the header describes.
    Reads the header only. Returns (array, map, data offset in the file)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            major, _ = fmt.read_magic(f)
            if major not in (1, 2):
                raise ValueError(f".npy format version {major} (1 or 2 expected)")
            shape, fortran, dtype = (fmt.read_array_header_1_0(f) if major == 1
                                     else fmt.read_array_header_2_0(f))
        except ValueError as e:
            raise IndexFormatError(f"{path}: not a readable .npy array ({e})") from None
        if fortran or dtype.hasobject:
            raise IndexFormatError(f"{path}: a Fortran-order or object array; the index "
                                   "stores C-order numbers")
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
        want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != want:
            what = "truncated" if size < want else "longer than its header says"
            raise IndexFormatError(f"{path} is {what}: {size} bytes, its header ({dtype} "
                                   f"{shape}) makes {want}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(shape, dtype, buffer=mm, offset=offset), mm, offset


def check_structure(path: Path, manifest: dict) -> dict[str, tuple[np.ndarray, mmap.mmap, int]]:
    """The cheap check of an index folder against its ``manifest``: every file is there with
    the size the manifest records, and every array is float16 of the manifest's shape, with
    the manifest's count of rows (and text width), and exactly the bytes its header describes.
    Reads the arrays' headers, not their data: the time it takes does not grow with the arrays.
    Returns each array's read-only memory map as (array, map, data offset)."""
    for key in FILES:
        entry = manifest["files"][key]
        fpath = path / entry["name"]
        if not fpath.exists():
            raise FileNotFoundError(f"index {path} is missing {entry['name']}")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "larger than recorded"
            raise IndexFormatError(f"{fpath} is {what}: {size} bytes, the manifest says "
                                   f"{entry['bytes']}; rebuild the index")
    dim, n = int(manifest["text_dim"]), int(manifest["count"])
    maps = {}
    for key in ARRAYS:
        fpath = path / manifest["files"][key]["name"]
        a, mm, offset = _map_npy(fpath)
        want = tuple(manifest["shapes"][key])
        if a.dtype != np.float16 or a.shape != want:
            raise IndexFormatError(f"{fpath}: {a.dtype} {a.shape}, the manifest says "
                                   f"float16 {want}")
        if a.ndim < 2 or a.shape[0] != n:
            raise IndexFormatError(f"{fpath}: {a.shape[0] if a.ndim else 0} rows, the manifest's "
                                   f"count is {n}")
        maps[key] = (a, mm, offset)
    if maps["text"][0].shape != (n, dim):
        raise IndexFormatError(f"{path}: text array {maps['text'][0].shape} does not match "
                               f"the manifest's count {n} and text dim {dim}")
    return maps


def verify_digests(path: Path, manifest: dict, *, progress: bool = False) -> int:
    """The full check: the sha256 of every file against the ``manifest``. Reads every byte
    (one pass, 4 MiB at a time; a progress bar over the bytes with ``progress``) and names every
    file that differs. Returns the bytes read."""
    from tqdm import tqdm

    entries = [manifest["files"][key] for key in FILES]
    bad, done = [], [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(n)

    with tqdm(total=sum(int(e["bytes"]) for e in entries), unit="B", unit_scale=True,
              unit_divisor=1024, desc="index: sha256", disable=not progress) as bar:
        for e in entries:
            if sha256_file(path / e["name"], progress=advance) != e["sha256"]:
                bad.append(e["name"])
    if bad:
        raise IndexFormatError(f"{path}: sha256 of {', '.join(bad)} differs from the manifest "
                               "(altered or corrupted); rebuild the index or copy it again")
    return done[0]


def verify_index(path: str | os.PathLike, *, progress: bool = False) -> dict:
    """Check the index folder at ``path`` completely: the structure (:func:`check_structure`),
    then the sha256 of every file (:func:`verify_digests`). What ``imageragturbo index
    verify`` runs, and what publishing or copying an index runs before it is served. Returns
    a summary (folder, count, files, bytes, seconds); raises like
    :meth:`RetrievalIndex.load`."""
    t0 = time.perf_counter()
    path, manifest = read_manifest(path)
    check_structure(path, manifest)  # the maps it opens close with their arrays
    done = verify_digests(path, manifest, progress=progress)
    return {"index": str(path), "count": int(manifest["count"]), "files": len(FILES),
            "bytes": done, "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- serving


@dataclass
class Neighbours:
    """The k neighbours of B queries: row ``ids`` [B, k] and cosine ``scores`` [B, k], the
    items' ``item_ids`` and ``captions`` (B lists of k), and their cached ``latents``
    [B, k, C, h, w] (None when the lookup was asked not to read them) and ``h``
    [B, k, C2, h2, w2] as float32."""

    ids: np.ndarray
    scores: np.ndarray
    item_ids: list[list[str]]
    captions: list[list[str]]
    latents: np.ndarray | None
    h: np.ndarray
    images: list[list[str]] = field(default_factory=list)


class RetrievalIndex:
    """A loaded, read-only retrieval index: safe to query from many threads at once (hnswlib
    searches release the GIL and never write to the graph; the arrays are read-only memory
    maps; ``ef`` is fixed at load)."""

    def __init__(self, path: Path, manifest: dict, graph, arrays: dict[str, np.ndarray],
                 items: list[dict], threads: int,
                 maps: dict[str, tuple[mmap.mmap, int]] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._graph = graph
        self._arrays = arrays
        self._items = items
        self._threads = threads
        self._maps = maps or {}  # key -> (the array's memory map, its data offset)
        self.captions = [it["caption"] for it in items]
        self.item_ids = [it["id"] for it in items]
        self.images = [it["image"] for it in items]

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_id: str | None = None,
             text_dim: int | None = None, ef: int | None = None, verify: bool = False,
             threads: int = 1) -> RetrievalIndex:
        """Open the index folder at ``path`` after checking its structure against its manifest.

        The check reads the manifest, the arrays' headers, the item list and the graph, never
        the arrays' data (they are memory-mapped): :func:`check_structure`. ``verify`` adds the
        sha256 of every file (:func:`verify_digests`), which reads everything: at the paper's
        database size that is 124 GB, so it belongs where an index is published or copied, or
        to ``imageragturbo index verify``, not to every replica's start.

        Raises FileNotFoundError for a missing folder, manifest or file, and
        :class:`IndexFormatError` (a ValueError) for a truncated or padded file, a wrong array
        header, shape, dtype or count, (with ``verify``) a file whose bytes changed, or a
        ``model_id`` / ``text_dim`` other than the index was built with. ``ef`` overrides the
        manifest's query beam; ``threads`` is hnswlib's per-call thread count (1 for serving,
        where concurrency comes from the callers).
        """
        import hnswlib

        given = Path(path)
        path, manifest = read_manifest(given)  # resolved: one version, even if republished
        if model_id is not None and model_id != manifest["model_id"]:
            raise IndexFormatError(f"index {path} was built with model {manifest['model_id']!r}, "
                                   f"not {model_id!r}: its keys are in another text space; "
                                   "rebuild it with `imageragturbo index build --model ...`")
        dim, n = int(manifest["text_dim"]), int(manifest["count"])
        if text_dim is not None and int(text_dim) != dim:
            raise IndexFormatError(f"index {path} has text dim {dim}, the encoder gives "
                                   f"{text_dim}; rebuild the index for this model")
        maps = check_structure(path, manifest)
        if verify:
            verify_digests(path, manifest)
        arrays = {}
        for key, (a, mm, _) in maps.items():
            if key in RANDOM_ACCESS and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_RANDOM)
            arrays[key] = a
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
        return cls(given, manifest, graph, arrays, items, threads,
                   {k: (mm, off) for k, (_, mm, off) in maps.items()})

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
        if key in RANDOM_ACCESS:
            self._prefetch(key, rows)
        flat = np.asarray(a[rows], dtype=np.float32)  # [U, *row shape]
        return flat[inverse].reshape(*ids.shape, *a.shape[1:])  # [*ids.shape, *row shape]

    def _prefetch(self, key: str, rows: np.ndarray) -> None:
        """Ask the kernel for exactly these rows of a memory-mapped array, one read request
        per row, before they are touched: their maps have no readahead (MADV_RANDOM, see
        :data:`RANDOM_ACCESS`), which would otherwise fault them in a page at a time. A
        no-op where the platform has no madvise."""
        mm, offset = self._maps.get(key, (None, 0))
        if mm is None or not hasattr(mm, "madvise"):
            return
        a = self._arrays[key]
        row = a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
        for r in rows.tolist():
            start = offset + r * row
            page = start - start % mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, page, start + row - page)

    def h(self, ids: np.ndarray) -> np.ndarray:
        """Cached H-space features of rows ``ids`` ([B, k] -> [B, k, C2, h2, w2], float32)."""
        return self._rows("h", ids)

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """Cached VAE latents of rows ``ids`` ([B, k] -> [B, k, C, h, w], float32)."""
        return self._rows("latents", ids)

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored keys of rows ``ids`` ([B, k] -> [B, k, D], float32)."""
        return self._rows("text", ids)

    def lookup(self, ids: np.ndarray, scores: np.ndarray, *, latents: bool = True) -> Neighbours:
        """Everything cached for the rows ``ids`` [B, k] that :meth:`search` returned; without
        ``latents``, all but the latents (``Neighbours.latents`` is None), which the request
        path never uses: it reads only the k rows of h (and the in-memory ids and captions)."""
        ids = np.asarray(ids, dtype=np.int64)
        return Neighbours(
            ids=ids, scores=np.asarray(scores, dtype=np.float32),
            item_ids=[[self.item_ids[i] for i in row] for row in ids],
            captions=[[self.captions[i] for i in row] for row in ids],
            latents=self.latents(ids) if latents else None, h=self.h(ids),
            images=[[self._items[i]["image"] for i in row] for row in ids])

    def query(self, prompts: Sequence[str], encoder: RetrievalEncoder, k: int) -> Neighbours:
        """Encode ``prompts`` with ``encoder`` (checked against the manifest) and return
        their k neighbours with the cached tensors."""
        if str(encoder.model_id) != self.model_id:
            raise IndexFormatError(f"index {self.path} was built with model {self.model_id!r}, "
                                   f"the encoder is {encoder.model_id!r}")
        ids, scores = self.search(encoder.encode_text(list(prompts)), k)
        return self.lookup(ids, scores)
