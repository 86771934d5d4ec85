"""The retrieval database: build, save, load and query.

ImageRAGTurbo retrieves text-image pairs "in the text feature space of a pretrained CLIP text
encoder", reusing "the same CLIP text features used by the stable diffusion model" (paper,
Sec. 4.1, *Implementation details*). The paper searches a 0.63M-pair OpenImages database with
ScaNN; here the search is hnswlib (HNSW graph, inner product on L2-normalised vectors, so the
score is the cosine similarity that Eq. 5 uses as lambda).

The retrieved branch needs no UNet pass at request time: h_retr = f_enc(tau(p_retr), t=0,
z_0_retr) does not depend on the query, so :func:`build_index` computes it once per item and
stores it beside the item's VAE latent (see ``shared/DESIGN.md``).

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

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
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


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Pair:
    """One text-image pair of a retrieval database; ``image`` is an absolute path."""

    id: str
    caption: str
    image: str


def shapesworld_pairs(root: str | os.PathLike, split: str = "retrieval") -> list[Pair]:
    """The pairs of a ShapesWorld split written by ``imageragturbo data build``."""
    from imageragturbo import shapesworld as sw

    root = Path(root)
    return [Pair(str(r["id"]), str(r["caption"]), str((root / r["image"]).resolve()))
            for r in sw.load_manifest(root, split)]


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """A user's pairs: JSONL (one ``{"caption", "image", "id"?}`` per line) or Parquet (same
    columns; needs pyarrow). Relative image paths are taken from the file's folder; a missing
    id becomes the row number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pairs file {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or convert the pairs to JSONL") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: pairs must be .jsonl or .parquet, not {suffix or 'no suffix'!r}")
    pairs = []
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("caption"), str) \
                or not isinstance(r.get("image"), str):
            raise ValueError(f"{path}: row {n} needs string 'caption' and 'image' fields")
        image = Path(r["image"])
        image = image if image.is_absolute() else path.parent / image
        pairs.append(Pair(str(r.get("id", n)), r["caption"], str(image.resolve())))
    return pairs


def load_image(path: str):
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} of the retrieval pairs does not exist")
    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- build


def _fingerprint(pairs: Sequence[Pair], model_id: str, text_dim: int) -> str:
    """What a partial build's rows depend on: the model and the pairs, in order (not the batch
    size, nor the hnswlib parameters, which only the final graph uses)."""
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\0{model_id}\0{text_dim}\0".encode())
    for p in pairs:
        h.update(f"{p.id}\0{p.caption}\0{p.image}\n".encode())
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    """Write, fsync and rename, so a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_batch(name: str, a: np.ndarray, rows: int, shape: tuple | None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim < 2 or a.shape[0] != rows:
        raise ValueError(f"encoder {name} returned shape {a.shape}, expected [{rows}, ...]")
    if shape is not None and tuple(a.shape[1:]) != tuple(shape):
        raise ValueError(f"encoder {name} returned rows of shape {tuple(a.shape[1:])}, "
                         f"expected {tuple(shape)} (text_dim, or the first batch's shape)")
    if not np.isfinite(a).all():
        raise ValueError(f"encoder {name} returned non-finite values")
    if np.abs(a).max(initial=0.0) > 65504:
        raise ValueError(f"encoder {name} returned values beyond the fp16 range")
    return a


def build_index(pairs: Sequence[Pair], encoder: RetrievalEncoder, out: str | os.PathLike, *,
                params: HNSWParams = HNSWParams(), batch_size: int = 64,
                threads: int | None = None, resume: bool = True, overwrite: bool = False,
                progress: bool = True, model_source: str | None = None,
                image_loader: Callable[[str], object] = load_image) -> Path:
    """Encode ``pairs`` with ``encoder`` and write a retrieval index folder at ``out``.

    Per batch: the text embedding (the retrieval key), the VAE latents of the images and the
    H-space features h = f_enc(tau(caption), t=0, latent), written into fp16 memory maps
    in ``<out>.partial/``. After every batch the row count is recorded, so an interrupted
    build resumes where it stopped (``resume=True``, when the model and the pairs are the
    same), or restarts from scratch otherwise. The hnswlib graph is built last, then the
    manifest, and only then is the folder renamed to ``out``: a crash at any point leaves no
    folder that :meth:`RetrievalIndex.load` accepts.

    ``model_source`` (a model name or path) is recorded so ``index query`` can load the same
    encoder. Returns ``out``.
    """
    import hnswlib
    from tqdm import tqdm

    out = Path(out)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no text-image pairs to index")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("pair ids must be unique")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to rebuild it")
    model_id, dim = str(encoder.model_id), int(encoder.text_dim)
    n = len(pairs)
    t0 = time.perf_counter()

    tmp = out.with_name(out.name + ".partial")
    fp = _fingerprint(pairs, model_id, dim)
    state = None
    if tmp.exists():
        try:
            state = json.loads((tmp / PROGRESS).read_text())
        except (OSError, ValueError):
            state = None
        if not resume or state is None or state.get("fingerprint") != fp:
            shutil.rmtree(tmp)
            state = None
    if state is None:
        tmp.mkdir(parents=True)
        state = {"fingerprint": fp, "done": 0, "shapes": None}
        _write_json(tmp / PROGRESS, state)

    maps: dict[str, np.ndarray] = {}

    def open_maps(shapes: dict, mode: str) -> None:
        for key in ARRAYS:
            maps[key] = np.lib.format.open_memmap(tmp / FILES[key], mode=mode,
                                                  dtype=np.float16, shape=(n, *shapes[key]))

    if state["shapes"] is not None:
        try:
            open_maps(state["shapes"], "r+")
        except (OSError, ValueError):  # a partial folder damaged by hand: start again
            maps.clear()
            shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            state = {"fingerprint": fp, "done": 0, "shapes": None}
            _write_json(tmp / PROGRESS, state)
    bar = tqdm(total=n, initial=state["done"], desc="index: encode", unit="pair",
               disable=not progress)
    for start in range(state["done"], n, batch_size):
        batch = pairs[start:start + batch_size]
        captions = [p.caption for p in batch]
        shapes = state["shapes"]
        text = _check_batch("encode_text", encoder.encode_text(captions), len(batch),
                            (dim,))
        norms = np.linalg.norm(text, axis=1)
        if np.abs(norms - 1).max() > 1e-2:
            raise ValueError("encoder encode_text must return L2-normalised rows "
                             f"(norms {norms.min():.3f}..{norms.max():.3f})")
        lat = _check_batch("encode_images", encoder.encode_images(
            [image_loader(p.image) for p in batch]), len(batch),
            None if shapes is None else shapes["latents"])
        h = _check_batch("h_features", encoder.h_features(lat, captions), len(batch),
                         None if shapes is None else shapes["h"])
        if shapes is None:
            state["shapes"] = {"text": [dim], "latents": list(lat.shape[1:]),
                               "h": list(h.shape[1:])}
            open_maps(state["shapes"], "w+")
        stop = start + len(batch)
        for key, a in (("text", text), ("latents", lat), ("h", h)):
            maps[key][start:stop] = a
            maps[key].flush()
        state["done"] = stop
        _write_json(tmp / PROGRESS, state)
        bar.update(len(batch))
    bar.close()

    # The graph is built from the stored fp16 keys (renormalised in fp32), so a resumed build
    # and a fresh one index the same vectors.
    keys = np.asarray(maps["text"], dtype=np.float32)  # [N, D]
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    for key in list(maps):
        del maps[key]  # close the memory maps before hashing
    graph = hnswlib.Index(space="ip", dim=dim)
    graph.init_index(max_elements=n, M=params.M, ef_construction=params.ef_construction,
                     random_seed=100)
    step = 10_000
    with tqdm(total=n, desc="index: hnsw", unit="vec", disable=not progress) as gbar:
        for s in range(0, n, step):
            graph.add_items(keys[s:s + step], np.arange(s, min(n, s + step)),
                            num_threads=threads or os.cpu_count() or 1)
            gbar.update(min(n, s + step) - s)
    graph.set_ef(params.ef)
    graph.save_index(str(tmp / FILES["index"]))
    del graph, keys

    with open(tmp / FILES["items"], "w") as f:
        for p in pairs:
            f.write(json.dumps({"id": p.id, "caption": p.caption, "image": p.image}) + "\n")

    files = {}
    for key, name in FILES.items():
        path = tmp / name
        files[key] = {"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_id": model_id,
        "model_source": model_source,
        "text_dim": dim,
        "count": n,
        "dtype": "float16",
        "shapes": {k: [n, *v] for k, v in state["shapes"].items()},
        "hnsw": {"space": "ip", "M": params.M, "ef_construction": params.ef_construction,
                 "ef": params.ef},
        "files": files,
        "build": {"seconds": round(time.perf_counter() - t0, 3), "batch_size": batch_size,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    (tmp / PROGRESS).unlink()
    _write_json(tmp / MANIFEST, manifest)
    publish(tmp, out)
    return out


def publish(built: Path, out: Path) -> None:
    """Make the finished folder ``built`` the index at ``out``, atomically for readers.

    ``out`` is a symlink to a versioned sibling (``<out>.v<time>-<pid>``) and is replaced by
    one rename (``os.replace`` of a new link), so a reader opening ``out`` finds the old index
    or the new one, never none and never a mix (:meth:`RetrievalIndex.load` resolves the link
    once). The previous version is kept until the next publish, for readers that resolved it a
    moment ago; older ones are removed. A real folder at ``out`` (an index built before
    versioning) is moved aside first: only then is there an instant with no index.
    """
    version = out.with_name(f"{out.name}.v{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-"
                            f"{time.monotonic_ns() % 10**6}")
    built.rename(version)
    link = out.with_name(out.name + ".link")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(version.name, target_is_directory=True)
    previous = out.resolve() if out.is_symlink() else None
    if out.exists() and not out.is_symlink():
        legacy = out.with_name(out.name + ".v0-legacy")
        if legacy.exists():
            shutil.rmtree(legacy)
        out.rename(legacy)
        previous = legacy
    os.replace(link, out)
    for old in out.parent.glob(f"{out.name}.v*"):
        if old.is_dir() and old.resolve() not in (version.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)


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

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, len(self))`` nearest items of each query by cosine similarity.

        ``query_embeddings`` is [B, D] (or [D]), the pipeline's pooled text embeddings
        (normalised here if they are not). Returns ``ids`` [B, k'] int64 row numbers and
        ``scores`` [B, k'] float32 cosine similarities, best first.
        """
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
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
