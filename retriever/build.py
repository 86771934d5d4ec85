"""Building a retrieval index (``build_index``): encode the pairs batch by batch into fp16
memory maps (resumable), build the hnswlib graph, write the manifest last, and publish the
folder atomically for readers (``publish``); copying one elsewhere (``copy_index``). Publishing
and copying check every file's sha256 against the manifest, so that a replica's load can
check only the structure. The format is described in ``index.py``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from imageragturbo.checksums import copy_with_sha256, sha256_file

from .index import (
    ARRAYS,
    FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    HNSWParams,
    IndexFormatError,
    RetrievalEncoder,
    check_structure,
    read_manifest,
    verify_index,
)
from .pairs import Pair, load_image


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
                params: HNSWParams = HNSWParams(), batch_size: int = 64,  # noqa: B008 - frozen
                threads: int | None = None, resume: bool = True, overwrite: bool = False,
                progress: bool = True, model_source: str | None = None,
                image_loader: Callable[[str], object] = load_image, rank: int = 0,
                world: int = 1, barrier: Callable[[], None] | None = None) -> Path | None:
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

    Several processes (``accelerate launch``: ``rank`` of ``world``, ``barrier`` waits for
    all): batch j after the resumed prefix is encoded by process j mod world, each writing its
    rows of the shared memory maps and counting its batches in ``progress-<rank>.json``; a
    rerun resumes after the longest prefix of batches all processes finished. The main
    process (rank 0) then builds the graph and publishes; the others return None.
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
    main = rank == 0
    wait = barrier or (lambda: None)
    maps: dict[str, np.ndarray] = {}

    def open_maps(shapes: dict, mode: str) -> None:
        for key in ARRAYS:
            maps[key] = np.lib.format.open_memmap(tmp / FILES[key], mode=mode,
                                                  dtype=np.float16, shape=(n, *shapes[key]))

    def encode(batch: Sequence[Pair], shapes: dict | None):
        captions = [p.caption for p in batch]
        text = _check_batch("encode_text", encoder.encode_text(captions), len(batch), (dim,))
        norms = np.linalg.norm(text, axis=1)
        if np.abs(norms - 1).max() > 1e-2:
            raise ValueError("encoder encode_text must return L2-normalised rows "
                             f"(norms {norms.min():.3f}..{norms.max():.3f})")
        lat = _check_batch("encode_images", encoder.encode_images(
            [image_loader(p.image) for p in batch]), len(batch),
            None if shapes is None else shapes["latents"])
        h = _check_batch("h_features", encoder.h_features(lat, captions), len(batch),
                         None if shapes is None else shapes["h"])
        return text, lat, h

    def fresh() -> dict:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        st = {"fingerprint": fp, "done": 0, "shapes": None}
        _write_json(tmp / PROGRESS, st)
        return st

    if main:
        state = None
        if tmp.exists():
            try:
                state = json.loads((tmp / PROGRESS).read_text())
            except (OSError, ValueError):
                state = None
            if not resume or state is None or state.get("fingerprint") != fp:
                state = None
        if state is None:
            state = fresh()
        # the batches the processes of the last run finished after its prefix: the longest
        # run of consecutive batches all done moves the prefix on
        parts = [json.loads(p.read_text()) for p in sorted(tmp.glob("progress-*.json"))]
        if parts and all(p.get("start") == state["done"] for p in parts):
            w = parts[0]["world"]
            done = {r: 0 for r in range(w)}
            for p in parts:
                if p["world"] == w and p["batch_size"] == parts[0]["batch_size"]:
                    done[p["rank"]] = p["count"]
            j = min(r + done[r] * w for r in range(w))
            state["done"] = min(n, state["done"] + j * parts[0]["batch_size"])
        for p in tmp.glob("progress-*.json"):
            p.unlink()
        if state["shapes"] is not None:
            try:
                open_maps(state["shapes"], "r+")
            except (OSError, ValueError):  # a partial folder damaged by hand: start again
                maps.clear()
                state = fresh()
        if state["shapes"] is None and world > 1:  # the shapes, from the first pair, for all
            t, lat, h = encode(pairs[:1], None)
            state["shapes"] = {"text": [dim], "latents": list(lat.shape[1:]),
                               "h": list(h.shape[1:])}
            open_maps(state["shapes"], "w+")
        _write_json(tmp / PROGRESS, state)
    wait()
    if not main:
        state = json.loads((tmp / PROGRESS).read_text())
        open_maps(state["shapes"], "r+")
    start0 = state["done"]
    batches = list(range(start0, n, batch_size))
    mine = batches[rank::world]
    bar = tqdm(total=n, initial=start0, desc="index: encode", unit="pair",
               disable=not (progress and main))
    for count, start in enumerate(mine, 1):
        batch = pairs[start:start + batch_size]
        text, lat, h = encode(batch, state["shapes"])
        if state["shapes"] is None:        # one process: the first batch gives the shapes
            state["shapes"] = {"text": [dim], "latents": list(lat.shape[1:]),
                               "h": list(h.shape[1:])}
            open_maps(state["shapes"], "w+")
        stop = start + len(batch)
        for key, a in (("text", text), ("latents", lat), ("h", h)):
            maps[key][start:stop] = a
            maps[key].flush()
        if world == 1:
            state["done"] = stop
            _write_json(tmp / PROGRESS, state)
        else:
            _write_json(tmp / f"progress-{rank}.json",
                        {"rank": rank, "world": world, "batch_size": batch_size,
                         "start": start0, "count": count})
        bar.update(len(batch) * (world if world > 1 else 1))
    bar.close()
    wait()
    if not main:
        maps.clear()
        return None
    for p in tmp.glob("progress-*.json"):
        p.unlink()
    state["done"] = n

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
    # The digests were just computed from these very files: checking them again would read
    # the whole index a second time (124 GB at the paper's size) to compare a hash with itself.
    publish(tmp, out, verify=False)
    return out


def publish(built: Path, out: Path, *, verify: bool = True, progress: bool = False) -> None:
    """Make the finished folder ``built`` the index at ``out``, atomically for readers.

    With ``verify`` (the default) ``built`` is first checked completely against its manifest
    (structure and every file's sha256, :func:`verify_index`); a folder that fails is left
    where it is and ``out`` is not touched. ``build_index`` passes ``verify=False``: it has
    just computed those digests from the same files.

    ``out`` is a symlink to a versioned sibling (``<out>.v<time>-<pid>``) and is replaced by
    one rename (``os.replace`` of a new link), so a reader opening ``out`` finds the old index
    or the new one, never none and never a mix (:meth:`RetrievalIndex.load` resolves the link
    once). The previous version is kept until the next publish, for readers that resolved it a
    moment ago; older ones are removed. A real folder at ``out`` (an index built before
    versioning) is moved aside first: only then is there an instant with no index.
    """
    built, out = Path(built), Path(out)
    if verify:
        verify_index(built, progress=progress)
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




def copy_index(src: str | os.PathLike, dst: str | os.PathLike, *,
               progress: bool = False) -> Path:
    """Copy the index at ``src`` into the new folder ``dst``, checking every file's sha256
    against ``src``'s manifest as it is copied (one read of each file, not two).

    The copy is written into ``<dst>.partial`` and renamed to ``dst`` only when every file
    matched; a mismatch removes it and raises :class:`IndexFormatError` naming the files, so
    a damaged index is never copied into a model repository. ``dst`` must not exist. Returns
    ``dst``.
    """
    from tqdm import tqdm

    path, manifest = read_manifest(src)
    check_structure(path, manifest)  # a truncated file fails here, before any copying
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists; copy the index to a new folder")
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    entries = [manifest["files"][key] for key in FILES]
    bad = []
    try:
        with tqdm(total=sum(int(e["bytes"]) for e in entries), unit="B", unit_scale=True,
                  unit_divisor=1024, desc="index: copy", disable=not progress) as bar:
            for e in entries:
                if copy_with_sha256(path / e["name"], tmp / e["name"],
                                    progress=bar.update) != e["sha256"]:
                    bad.append(e["name"])
        if bad:
            raise IndexFormatError(f"{path}: sha256 of {', '.join(bad)} differs from the "
                                   "manifest (altered or corrupted); not copied")
        shutil.copy2(path / MANIFEST, tmp / MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dst)
    return dst
