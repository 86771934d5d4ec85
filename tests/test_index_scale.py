"""The index at deployment size: loading does not read the arrays, and the request path reads
only the k rows of h it uses.

The paper's database (0.63M items, 4x64x64 latents and 1280x8x8 H features in fp16) makes a
124 GB index folder. Here a generated index of 65,536 items with those row shapes (12.9 GB of
arrays) is written as sparse files (``np.lib.format.open_memmap`` writes the header and the
last byte, not the data), beside one of the same count, graph and items with 4x2x2 and 6x1x1
rows (2.9 MB of arrays). Everything else is real: ``RetrievalIndex.load``, the kernel's counters
of this process (``/proc/self/io`` rchar: bytes returned by read() calls; ``getrusage`` page
faults: pages touched through memory maps) and the page cache (``mincore``).

``read_bytes`` in ``/proc/self/io`` would not do: it counts reads from the block device, and a
sparse file's holes, like any page already cached, cost none, so it is 0 whatever a load reads.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imageragturbo.retriever import RetrievalIndex
from imageragturbo.retriever.index import FILES, FORMAT, FORMAT_VERSION

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="/proc/self/io, mincore and sparse files: Linux")

N = 65_536                       # items: a tenth of the paper's 0.63M, same row shapes
DIM = 16                         # text key width (the graph's cost does not depend on the arrays)
LARGE = {"latents": (4, 64, 64), "h": (1280, 8, 8)}   # SD-Turbo at 512 px: 32 KiB + 160 KiB/row
SMALL = {"latents": (4, 2, 2), "h": (6, 1, 1)}
PAGE = mmap.PAGESIZE


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """What both indexes share: text keys, the hnswlib graph over them, the item list."""
    import hnswlib

    root = tmp_path_factory.mktemp("index_scale")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((N, DIM)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    np.save(root / FILES["text"], keys.astype(np.float16))
    # A small beam and few links: the graph only has to load; building it is not under test.
    graph = hnswlib.Index(space="ip", dim=DIM)
    graph.init_index(max_elements=N, M=4, ef_construction=16, random_seed=100)
    graph.add_items(keys, np.arange(N), num_threads=1)
    graph.save_index(str(root / FILES["index"]))
    with open(root / FILES["items"], "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": f"item-{i:06d}", "caption": f"w{i % 300} w{i % 7}",
                                "image": f"img/{i:06d}.png"}) + "\n")
    return root, keys


def _generated_index(shared, out: Path, rows: dict[str, tuple]) -> int:
    """An index folder at ``out`` whose latents and h have the given row shapes, written as
    sparse files; returns their apparent size in bytes. The manifest records every file's size;
    the sha256 of the two generated arrays is a placeholder (hashing 13 GB is what the load must
    not do, and a load that hashed would fail on it)."""
    root, _ = shared
    out.mkdir()
    for key in ("text", "index", "items"):
        shutil.copyfile(root / FILES[key], out / FILES[key])
    array_bytes = 0
    for key, shape in rows.items():
        a = np.lib.format.open_memmap(out / FILES[key], mode="w+", dtype=np.float16,
                                      shape=(N, *shape))
        array_bytes += a.nbytes
        del a
    files = {}
    for key, name in FILES.items():
        size = (out / name).stat().st_size
        files[key] = {"name": name, "bytes": size,
                      "sha256": "0" * 64 if key in rows else _sha256(out / name)}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "model_id": "generated",
                "model_source": None, "text_dim": DIM, "count": N, "dtype": "float16",
                "shapes": {"text": [N, DIM], **{k: [N, *v] for k, v in rows.items()}},
                "hnsw": {"space": "ip", "M": 4, "ef_construction": 16, "ef": 32},
                "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return array_bytes


@pytest.fixture(scope="module")
def indexes(shared, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    small = _generated_index(shared, root / "small", SMALL)
    large = _generated_index(shared, root / "large", LARGE)
    h = root / "large" / FILES["h"]
    if h.stat().st_blocks * 512 > 2**30:  # the filesystem wrote the holes out: do not fill it
        shutil.rmtree(root / "large")
        pytest.skip("this filesystem has no sparse files")
    return {"small": (root / "small", small), "large": (root / "large", large)}


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _faults() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt + ru.ru_majflt


def _load_cost(path: Path) -> tuple[RetrievalIndex, float, int, int]:
    """Load ``path`` and return the index, seconds, bytes read by read() calls, page faults."""
    r0, f0, t0 = _rchar(), _faults(), time.perf_counter()
    index = RetrievalIndex.load(path)
    return index, time.perf_counter() - t0, _rchar() - r0, _faults() - f0


def test_generated_large_index_is_deployment_sized_and_sparse(indexes):
    path, array_bytes = indexes["large"]
    assert array_bytes == N * (32 + 160) * 2**10 == 12 * 2**30   # 12.9 GB of latents and h ...
    used = sum((path / FILES[k]).stat().st_blocks * 512 for k in ("latents", "h"))
    assert used < 2**20                    # ... taking under 1 MiB of disk


def test_load_time_and_bytes_read_do_not_grow_with_the_arrays(indexes, capsys):
    """The large index's arrays are 4,500x the small one's; its load reads the same bytes
    (manifest, headers, items, graph), touches about as many pages, and takes about as long.
    Reading its h alone would be 2.7M page faults, or 10 GiB through read()."""
    (small, small_bytes), (large, large_bytes) = indexes["small"], indexes["large"]
    RetrievalIndex.load(small)  # imports and first-use allocations, out of the measurement
    costs = {}
    for name, path in (("small", small), ("large", large), ("small", small), ("large", large)):
        index, seconds, rchar, faults = _load_cost(path)
        assert len(index) == N
        del index
        prev = costs.get(name, (np.inf, np.inf, np.inf))
        costs[name] = tuple(min(a, b) for a, b in zip(prev, (seconds, rchar, faults)))
    (ts, rs, fs), (tl, rl, fl) = costs["small"], costs["large"]
    with capsys.disabled():
        print(f"\nload of {N} items: small index ({small_bytes / 2**20:.1f} MiB of arrays) "
              f"{ts * 1000:.0f} ms, {rs / 2**20:.2f} MiB read(), {fs} page faults; large "
              f"({large_bytes / 2**30:.1f} GiB of arrays) {tl * 1000:.0f} ms, "
              f"{rl / 2**20:.2f} MiB read(), {fl} page faults")
    assert abs(rl - rs) < 64 * 2**10           # the same files read, but for a few header bytes
    # What both read is the item list (4.4 MiB) and the graph: hnswlib's loader re-reads its
    # 7.4 MiB file through a buffer refilled after each per-item seek (133 MiB of read()).
    assert rl < 2**30                          # against 12 GiB of arrays
    assert fl < fs + 4096                      # 16 MiB of slack against 10 GiB of h
    assert tl < 3 * ts + 1.0                   # generous: a shared 2-core machine


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache now (mincore on a fresh read-only map, which itself
    touches nothing)."""
    m = np.memmap(path, mode="r", dtype=np.uint8)
    n = (m.size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(m.ctypes.data), ctypes.c_size_t(m.size), vec) != 0:
        pytest.skip(f"mincore: errno {ctypes.get_errno()}")
    return int((np.frombuffer(vec, np.uint8) & 1).sum())


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_the_request_path_reads_only_the_k_rows_of_h(indexes, shared):
    """``runtime.retrieve`` (what the served retriever runs) on the large index: of h, the
    pages of the k rows per query come into the page cache, no more (the kernel's readahead
    would bring in ~64 MiB for 8 rows); of the latents, nothing."""
    from imageragturbo.runtime import request

    path, _ = indexes["large"]
    _, keys = shared
    index = RetrievalIndex.load(path)
    for key in ("latents", "h"):
        _evict(path / FILES[key])
    if _resident_pages(path / FILES["h"]) or _resident_pages(path / FILES["latents"]):
        pytest.skip("the page cache kept pages that were asked to go")
    q = keys[[5, 40_000]] + 0.01
    h, scores, nb = request.retrieve(index, q, 4, rerank=0)
    rows = len(np.unique(nb.ids))
    assert h.shape == (2, 4, *LARGE["h"]) and nb.latents is None
    row_pages = int(np.prod(LARGE["h"])) * 2 // PAGE   # 40 pages of 4 KiB
    assert rows * row_pages <= _resident_pages(path / FILES["h"]) <= rows * (row_pages + 1)
    assert _resident_pages(path / FILES["latents"]) == 0
