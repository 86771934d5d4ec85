"""The retriever: build, save, load and query round trip; recall against exact search;
clean errors on damaged or mismatched indexes; concurrent queries; interrupted builds; CLI.

hnswlib, the files, the memory maps and the threads are all real. The model is
``HashingTestEncoder`` below: a small deterministic stand-in for the pipeline's encoders
(hashed word tokens -> random-projection text vector; fixed random projections of the pixels
for latents and of latents + text for h), so the tests need no trained model.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageragturbo.retriever import (
    DEFAULT_EF,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    HNSWParams,
    IndexFormatError,
    Pair,
    RetrievalEncoder,
    RetrievalIndex,
    build_index,
    read_pairs,
    shapesworld_pairs,
)

IMG = 8  # test images are 8x8 RGB


class HashingTestEncoder:
    """Test encoder (not a model): deterministic, fast, satisfies ``RetrievalEncoder``."""

    def __init__(self, dim: int = 32, model_id: str = "test-hashing-encoder/v1",
                 fail_after_batches: int | None = None):
        self.model_id = model_id
        self.text_dim = dim
        self.fail_after_batches = fail_after_batches
        self.text_rows = 0  # rows encoded, to check that a resumed build skips done rows
        rng = np.random.default_rng(1234)
        self._img_proj = rng.standard_normal((IMG * IMG * 3, 4 * 2 * 2)).astype(np.float32)
        self._h_proj = rng.standard_normal((16 + dim, 6)).astype(np.float32)

    def _token(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.text_dim).astype(np.float32)

    def _embed(self, captions: list[str]) -> np.ndarray:
        out = np.stack([sum(self._token(w) for w in c.lower().split()) for c in captions])
        return out / np.linalg.norm(out, axis=1, keepdims=True)  # [B, D]

    def encode_text(self, captions: list[str]) -> np.ndarray:
        if self.fail_after_batches is not None:
            if self.fail_after_batches == 0:
                raise KeyboardInterrupt("simulated crash during the build")
            self.fail_after_batches -= 1
        self.text_rows += len(captions)
        return self._embed(captions)

    def encode_images(self, images: list) -> np.ndarray:
        px = np.stack([np.asarray(im.resize((IMG, IMG)), dtype=np.float32) / 255.0
                       for im in images])  # [B, 8, 8, 3]
        return (px.reshape(len(images), -1) @ self._img_proj / 8).reshape(-1, 4, 2, 2)

    def h_features(self, latents: np.ndarray, captions: list[str]) -> np.ndarray:
        z = latents.reshape(len(latents), -1)  # [B, 4, 2, 2] -> [B, 16]
        x = np.concatenate([z, self._embed(captions)], axis=1)  # [B, 16 + D]
        return (x @ self._h_proj).reshape(-1, 6, 1, 1)


WORDS = [f"w{i}" for i in range(300)]


def make_pairs(root: Path, n: int, seed: int = 0) -> list[Pair]:
    """n pairs with distinct random 6-word captions and real 8x8 PNG images."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        caption = " ".join(rng.choice(WORDS, 6, replace=False))
        path = root / "img" / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(path)
        pairs.append(Pair(f"item-{i:05d}", caption, str(path)))
    return pairs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("retriever")
    pairs = make_pairs(root, 300)
    enc = HashingTestEncoder()
    out = build_index(pairs, enc, root / "index", batch_size=64, progress=False,
                      model_source="test")
    return pairs, enc, out


def test_test_encoder_satisfies_the_protocol():
    assert isinstance(HashingTestEncoder(), RetrievalEncoder)


def test_build_save_load_query_round_trip(built):
    pairs, enc, out = built
    m = json.loads((out / "manifest.json").read_text())
    assert m["model_id"] == enc.model_id and m["text_dim"] == 32 and m["count"] == 300
    assert m["shapes"] == {"text": [300, 32], "latents": [300, 4, 2, 2], "h": [300, 6, 1, 1]}
    assert m["hnsw"] == {"space": "ip", "M": DEFAULT_M, "ef_construction": DEFAULT_EF_CONSTRUCTION,
                         "ef": DEFAULT_EF}
    for f in m["files"].values():
        assert hashlib.sha256((out / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert not out.with_name(out.name + ".partial").exists()

    index = RetrievalIndex.load(out, model_id=enc.model_id, text_dim=enc.text_dim)
    for name in ("text", "latents", "h"):
        assert not index._arrays[name].flags.writeable  # served read-only
    rows = [0, 17, 299]
    nb = index.query([pairs[i].caption for i in rows], enc, k=3)
    assert nb.ids[:, 0].tolist() == rows  # each caption finds its own item first
    assert np.allclose(nb.scores[:, 0], 1.0, atol=2e-3)
    assert (np.diff(nb.scores, axis=1) <= 1e-6).all()  # best first
    assert [c[0] for c in nb.captions] == [pairs[i].caption for i in rows]
    assert [c[0] for c in nb.item_ids] == [pairs[i].id for i in rows]
    images = [Image.open(pairs[i].image).convert("RGB") for i in rows]
    lat = enc.encode_images(images)
    h = enc.h_features(lat, [pairs[i].caption for i in rows])
    assert nb.latents.shape == (3, 3, 4, 2, 2) and nb.h.shape == (3, 3, 6, 1, 1)
    np.testing.assert_allclose(nb.latents[:, 0], lat, rtol=2e-3, atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(nb.h[:, 0], h, rtol=2e-3, atol=5e-3)


def test_search_recall_against_exact_search(built):
    _, enc, out = built
    index = RetrievalIndex.load(out, ef=16)
    rng = np.random.default_rng(7)
    prompts = [" ".join(rng.choice(WORDS, 4, replace=False)) for _ in range(200)]
    q = enc.encode_text(prompts)
    ids, scores = index.search(q, 10)
    ex_ids, ex_scores = index.exact_search(q, 10)
    # By score, so that exact ties cannot count as misses.
    found = (scores >= ex_scores[:, -1:] - 1e-5).sum() / scores.size
    assert found >= 0.95
    assert (ids[:, 0] == ex_ids[:, 0]).mean() >= 0.95
    # Scores are the cosines of the stored keys.
    keys = index.text_embeddings(ids)  # [B, 10, D]
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.einsum("bkd,bd->bk", keys, q), scores, atol=1e-4)


def test_k_larger_than_count_returns_every_item_once(built):
    _, enc, out = built
    index = RetrievalIndex.load(out, verify=False)
    ids, scores = index.search(enc.encode_text(["w1 w2 w3"]), 1000)
    assert ids.shape == scores.shape == (1, 300)
    assert sorted(ids[0].tolist()) == list(range(300))
    with pytest.raises(ValueError, match="k must be"):
        index.search(enc.encode_text(["w1"]), 0)


def test_concurrent_queries_equal_serial_ones(built):
    _, enc, out = built
    index = RetrievalIndex.load(out, verify=False)
    rng = np.random.default_rng(3)
    q = enc.encode_text([" ".join(rng.choice(WORDS, 5, replace=False)) for _ in range(400)])
    serial = [index.search(q[i], 5) for i in range(len(q))]
    serial_h = [index.h(ids) for ids, _ in serial]

    def one(i):
        ids, scores = index.search(q[i], 5)
        return ids, scores, index.lookup(ids, scores).h

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(len(q))))
    for (ids, scores), h, (cids, cscores, ch) in zip(serial, serial_h, results):
        assert np.array_equal(ids, cids) and np.array_equal(scores, cscores)
        assert np.array_equal(h, ch)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file_gives_a_clean_error(built, tmp_path):
    for name in ("h.f16.npy", "index.hnsw", "items.jsonl"):
        idx = _copy(built[2], tmp_path / name)
        data = (idx / name).read_bytes()
        (idx / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(IndexFormatError, match="truncated"):
            RetrievalIndex.load(idx)


def test_a_truncated_array_is_caught_by_the_cheap_load_check_even_with_a_matching_manifest(
        built, tmp_path):
    """The load check reads headers, not data, and still refuses a cut array: by the size the
    manifest records, and, when the manifest was rewritten to match, by the size the .npy
    header implies."""
    idx = _copy(built[2], tmp_path / "idx")
    data = (idx / "h.f16.npy").read_bytes()
    (idx / "h.f16.npy").write_bytes(data[:-100])
    with pytest.raises(IndexFormatError, match="truncated: .* the manifest says"):
        RetrievalIndex.load(idx)
    m = json.loads((idx / "manifest.json").read_text())
    m["files"]["h"]["bytes"] = len(data) - 100
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match=r"h.f16.npy is truncated: .* its header"):
        RetrievalIndex.load(idx)


def _corrupt(idx: Path, name: str = "latents.f16.npy") -> Path:
    """Flip the last byte of one of the index's files: same size, same header, other data."""
    data = bytearray((idx / name).read_bytes())
    data[-1] ^= 0xFF
    (idx / name).write_bytes(bytes(data))
    return idx


def test_altered_file_fails_the_checksum_when_verified(built, tmp_path):
    """A changed byte inside an array passes the cheap load check (it reads no data: that is
    the point at 124 GB) and is caught by the full check, ``load(verify=True)``."""
    idx = _corrupt(_copy(built[2], tmp_path / "idx"))
    assert len(RetrievalIndex.load(idx)) == 300
    with pytest.raises(IndexFormatError, match="sha256 of latents.f16.npy differs"):
        RetrievalIndex.load(idx, verify=True)


def test_index_verify_command_catches_a_corrupted_array(built, tmp_path, capsys):
    from imageragturbo.commands.main import main

    assert main(["index", "verify", str(built[2]), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    m = json.loads((built[2] / "manifest.json").read_text())
    assert res["ok"] and res["count"] == 300
    assert res["bytes"] == sum(f["bytes"] for f in m["files"].values())  # every byte read
    idx = _corrupt(_copy(built[2], tmp_path / "idx"), "h.f16.npy")
    assert main(["index", "verify", str(idx)]) == 2
    err = capsys.readouterr().err
    assert "sha256 of h.f16.npy differs" in err and "index: sha256" in err  # the progress bar
    (idx / "text.f16.npy").write_bytes(b"")
    assert main(["index", "verify", str(idx), "--quiet"]) == 2
    assert "text.f16.npy is truncated" in capsys.readouterr().err


def test_publish_refuses_a_corrupted_index_and_keeps_the_current_one(built, tmp_path):
    from imageragturbo.retriever import publish

    pairs, enc, _ = built
    out = tmp_path / "idx"
    build_index(pairs[:10], enc, out, progress=False)
    current = out.resolve()
    other = build_index(pairs[:20], enc, tmp_path / "elsewhere", progress=False).resolve()
    staged = _corrupt(_copy(other, tmp_path / "staged"))
    with pytest.raises(IndexFormatError, match="sha256 of latents.f16.npy differs"):
        publish(staged, out)
    assert staged.is_dir() and out.resolve() == current and len(RetrievalIndex.load(out)) == 10
    good = _copy(other, tmp_path / "good")
    publish(good, out)
    assert not good.exists() and len(RetrievalIndex.load(out)) == 20


def test_copy_index_checks_digests_as_it_copies(built, tmp_path):
    from imageragturbo.retriever import copy_index

    dst = copy_index(built[2], tmp_path / "copy")
    for f in json.loads((dst / "manifest.json").read_text())["files"].values():
        assert (dst / f["name"]).read_bytes() == (built[2] / f["name"]).read_bytes()
    assert len(RetrievalIndex.load(dst, verify=True)) == 300
    with pytest.raises(FileExistsError):
        copy_index(built[2], dst)
    bad = _corrupt(_copy(built[2], tmp_path / "bad"), "index.hnsw")
    with pytest.raises(IndexFormatError, match="sha256 of index.hnsw differs.*not copied"):
        copy_index(bad, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists() and not (tmp_path / "copy2.partial").exists()


def test_missing_file_and_missing_index_are_file_not_found(built, tmp_path):
    idx = _copy(built[2], tmp_path / "idx")
    (idx / "text.f16.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing text.f16.npy"):
        RetrievalIndex.load(idx)
    with pytest.raises(FileNotFoundError, match="no retrieval index"):
        RetrievalIndex.load(tmp_path / "nowhere")


def test_wrong_dim_or_wrong_model_give_clean_errors(built, tmp_path):
    _, enc, out = built
    with pytest.raises(IndexFormatError, match="text dim 32"):
        RetrievalIndex.load(out, text_dim=64, verify=False)
    with pytest.raises(IndexFormatError, match="built with model"):
        RetrievalIndex.load(out, model_id="some-other-model", verify=False)
    index = RetrievalIndex.load(out, verify=False)
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        index.search(np.ones((2, 31), np.float32), 3)
    with pytest.raises(IndexFormatError, match="built with model"):
        index.query(["w1"], HashingTestEncoder(model_id="other"), 3)
    # An array whose shape disagrees with the manifest (here: a wrong text dim).
    idx = _copy(out, tmp_path / "idx")
    m = json.loads((idx / "manifest.json").read_text())
    np.save(idx / "text.f16.npy", np.zeros((300, 31), np.float16))
    m["files"]["text"]["bytes"] = (idx / "text.f16.npy").stat().st_size
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match=r"\(300, 31\)"):
        RetrievalIndex.load(idx, verify=False)


def test_encoder_output_is_validated(tmp_path):
    pairs = make_pairs(tmp_path, 4)

    class Unnormalised(HashingTestEncoder):
        def encode_text(self, captions):
            return 3 * super().encode_text(captions)

    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(pairs, Unnormalised(), tmp_path / "idx", progress=False)

    class WrongDim(HashingTestEncoder):  # declares text_dim 32, returns 16
        def encode_text(self, captions):
            t = super().encode_text(captions)[:, :16]
            return t / np.linalg.norm(t, axis=1, keepdims=True)

    with pytest.raises(ValueError, match=r"rows of shape \(16,\), expected \(32,\)"):
        build_index(pairs, WrongDim(), tmp_path / "i2", progress=False)


def test_interrupted_build_leaves_no_loadable_index_and_resumes(tmp_path):
    pairs = make_pairs(tmp_path, 100)
    out = tmp_path / "index"
    crashing = HashingTestEncoder(fail_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        build_index(pairs, crashing, out, batch_size=16, progress=False)
    assert not out.exists()
    assert (tmp_path / "index.partial").exists()
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        RetrievalIndex.load(out)
    with pytest.raises(FileNotFoundError, match="not a complete"):
        RetrievalIndex.load(tmp_path / "index.partial")

    resumed_enc = HashingTestEncoder()
    build_index(pairs, resumed_enc, out, batch_size=16, progress=False)
    assert resumed_enc.text_rows == 100 - 3 * 16  # only the rows not done before the crash
    fresh = build_index(pairs, HashingTestEncoder(), tmp_path / "fresh", batch_size=16,
                        progress=False)
    a, b = RetrievalIndex.load(out), RetrievalIndex.load(fresh)
    for name in ("text", "latents", "h"):
        assert np.array_equal(a._arrays[name], b._arrays[name])
    q = HashingTestEncoder().encode_text([p.caption for p in pairs[:20]])
    assert np.array_equal(a.search(q, 5)[0], b.search(q, 5)[0])

    # Other pairs (or another model) make the partial build stale: it restarts from row 0.
    with pytest.raises(KeyboardInterrupt):
        build_index(pairs, HashingTestEncoder(fail_after_batches=1), tmp_path / "x",
                    batch_size=16, progress=False)
    enc = HashingTestEncoder()
    build_index(pairs[:50], enc, tmp_path / "x", batch_size=16, progress=False)
    assert enc.text_rows == 50


def test_damaged_partial_build_restarts_from_scratch(tmp_path):
    pairs = make_pairs(tmp_path, 40)
    with pytest.raises(KeyboardInterrupt):
        build_index(pairs, HashingTestEncoder(fail_after_batches=2), tmp_path / "idx",
                    batch_size=10, progress=False)
    partial = tmp_path / "idx.partial" / "h.f16.npy"
    partial.write_bytes(partial.read_bytes()[:100])  # cut inside the data
    enc = HashingTestEncoder()
    build_index(pairs, enc, tmp_path / "idx", batch_size=10, progress=False)
    assert enc.text_rows == 40
    assert len(RetrievalIndex.load(tmp_path / "idx")) == 40


def test_existing_index_needs_overwrite(built, tmp_path):
    pairs, _, out = built
    idx = _copy(out, tmp_path / "idx")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_index(pairs[:10], HashingTestEncoder(), idx, progress=False)
    build_index(pairs[:10], HashingTestEncoder(), idx, overwrite=True, progress=False)
    assert len(RetrievalIndex.load(idx)) == 10
    assert not (tmp_path / "idx.old").exists()


def test_rebuilding_an_index_never_leaves_readers_without_one(built, tmp_path):
    """Replacing an index is atomic for readers: a thread loading and querying it in a loop
    while it is rebuilt three times never fails, and sees only whole indexes (10 or 20 items,
    as built), never a missing or mixed one."""
    import threading

    pairs, enc, _ = built
    idx = tmp_path / "idx"
    build_index(pairs[:10], enc, idx, progress=False)
    q = enc.encode_text([pairs[0].caption])
    errors, sizes, stop = [], set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                index = RetrievalIndex.load(idx)
                index.search(q, 3)
                sizes.add(len(index))
            except Exception as e:  # noqa: BLE001 - any failure is the bug under test
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in (20, 10, 20):
            build_index(pairs[:n], enc, idx, overwrite=True, progress=False)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert sizes <= {10, 20} and len(RetrievalIndex.load(idx)) == 20
    versions = sorted(p.name for p in tmp_path.glob("idx.v*"))
    assert len(versions) <= 2, versions  # the current and the previous one


def test_read_pairs_jsonl_resolves_paths_and_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    lines = [{"caption": "a red star", "image": "a.png"},
             {"caption": "two blue circles", "image": str(tmp_path / "a.png"), "id": "x7"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert [p.id for p in pairs] == ["0", "x7"]
    assert pairs[0].image == str((tmp_path / "a.png").resolve())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no caption"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        read_pairs(tmp_path / "a.png")


def test_parquet_pairs_need_pyarrow_and_say_so(tmp_path):
    path = tmp_path / "pairs.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pyarrow"):
            read_pairs(path)
        return
    pq.write_table(pa.table({"caption": ["a red star"], "image": ["a.png"]}), path)
    assert read_pairs(path)[0].caption == "a red star"


def test_index_build_flags_are_hnswparams_own_defaults_and_reach_it(capsys):
    """The hnswlib flags are made from ``HNSWParams`` (its defaults are the only copy), each
    with its help text, and what is given on the command line reaches the build's params."""
    from imageragturbo.commands.flags import dataclass_from_args
    from imageragturbo.commands.main import build_parser

    parser = build_parser()
    plain = parser.parse_args(["index", "build"])
    assert dataclass_from_args(HNSWParams, plain) == HNSWParams() == HNSWParams(
        DEFAULT_M, DEFAULT_EF_CONSTRUCTION, DEFAULT_EF)
    given = parser.parse_args(["index", "build", "--M", "8", "--ef-construction", "40",
                               "--ef", "20"])
    assert dataclass_from_args(HNSWParams, given) == HNSWParams(8, 40, 20)
    bench = parser.parse_args(["bench", "retrieval", "--M", "12"])
    assert (bench.M, bench.ef_construction, bench.ef) == (12, DEFAULT_EF_CONSTRUCTION, DEFAULT_EF)
    with pytest.raises(SystemExit):
        parser.parse_args(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in (("--M M", "hnswlib links per node (default: 16)"),
                        ("--ef-construction EF_CONSTRUCTION", "build beam width (default: 100)"),
                        ("--ef EF", "raised to k when k is larger) (default: 64)")):
        assert flag in text and words in text, (flag, text)
    with pytest.raises(ValueError):
        HNSWParams(M=0)


@pytest.fixture
def test_model(monkeypatch):
    """``imageragturbo.model.load_retrieval_encoder`` answering with the test encoder."""
    mod = types.ModuleType("imageragturbo.model")
    mod.load_retrieval_encoder = lambda name: HashingTestEncoder(model_id=f"test:{name}")
    monkeypatch.setitem(sys.modules, "imageragturbo.model", mod)
    enc = types.ModuleType("imageragturbo.model.encoder")   # `index build --device`'s check
    enc.resolve_device = lambda device: device
    monkeypatch.setitem(sys.modules, "imageragturbo.model.encoder", enc)


def test_cli_index_build_and_query_on_shapesworld(tmp_path, capsys, test_model):
    from imageragturbo import shapesworld as sw
    from imageragturbo.commands.main import main

    data = sw.build_dataset(tmp_path / "sw", {"retrieval": 40}, workers=1, progress=False)
    assert len(shapesworld_pairs(data)) == 40
    idx = tmp_path / "idx"
    assert main(["index", "build", "--data", str(data), "--out", str(idx), "--model", "tiny",
                 "--batch-size", "16", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40
    assert main(["index", "query", "a red star left of a blue circle", "-k", "5",
                 "--index", str(idx)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: a red star left of a blue circle" and len(lines) == 6
    captions = {r["caption"] for r in sw.load_manifest(data, "retrieval")}
    for line in lines[1:]:
        rank, score, _id, caption = line.split(None, 3)
        assert -1 <= float(score) <= 1 and caption in captions
    assert main(["index", "query", "a star", "-k", "100", "--json", "--index", str(idx)]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["neighbours"]) == 40
    # A model other than the index's, and a missing index: exit code 2 with a message.
    assert main(["index", "query", "a star", "--index", str(idx), "--model", "other"]) == 2
    assert "built with model" in capsys.readouterr().err
    assert main(["index", "query", "a star", "--index", str(tmp_path / "none")]) == 2
    assert "no retrieval index" in capsys.readouterr().err


def test_cli_bench_retrieval_json(capsys):
    from imageragturbo.commands.main import main

    assert main(["bench", "retrieval", "--n", "3000", "--dim", "48", "--queries", "100",
                 "--exact-queries", "20", "--clusters", "64", "--intrinsic-dim", "16",
                 "--threads", "1", "--no-scann", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"hnsw", "exact"} <= set(res) and "scann" not in res
    assert res["hnsw"]["recall@10"] >= 0.95 and res["exact"]["recall@10"] == 1.0
    for r in (res["hnsw"], res["exact"]):
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["index_bytes"] > 0
    assert res["hnsw"]["index_bytes"] > 3000 * 48 * 4  # the vectors plus the graph


def test_clustered_vectors_are_clustered_not_uniform():
    from imageragturbo.retriever.bench import clustered_vectors

    x = clustered_vectors(2000, 64, clusters=20, intrinsic_dim=16)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = x[:200] @ x.T  # [200, 2000]
    nn = np.sort(sims, axis=1)[:, -2]  # nearest other point
    u = np.random.default_rng(0).standard_normal((2000, 64))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    nn_uniform = np.sort(u[:200] @ u.T, axis=1)[:, -2]
    assert nn.mean() > nn_uniform.mean() + 0.2


def test_every_subcommand_has_help(capsys):
    from imageragturbo.commands.main import main

    for argv in (["index", "--help"], ["index", "build", "--help"], ["index", "query", "--help"],
                 ["index", "verify", "--help"], ["bench", "retrieval", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_caption_terms_keep_word_bindings_a_bag_of_words_loses():
    from imageragturbo.retriever.index import caption_terms, lexical_overlap

    assert caption_terms("A picture of a red circle") == {"red", "circle", "red circle"}
    prompt = "a red circle and a blue square"
    # the same four words, bound the other way round: the pairs tell them apart
    assert lexical_overlap(prompt, "a blue circle and a red square") < 1.0
    assert lexical_overlap(prompt, "an image showing a red circle and a blue square") == 1.0
    assert lexical_overlap("", "a red circle") == 0.0


def test_rerank_puts_the_caption_with_the_prompts_words_first_and_keeps_cosines(built):
    pairs, enc, out = built
    index = RetrievalIndex.load(out, verify=False)
    q = enc.encode_text([pairs[5].caption])
    dense_ids, dense_scores = index.search(q, 40)
    # a prompt worded as the dense 11th neighbour's caption: only its words can lift it
    target = int(dense_ids[0, 10])
    prompt = pairs[target].caption
    ids, scores = index.search(q, 3, prompts=[prompt], rerank=40)
    assert ids[0, 0] == target and ids[0, 0] != dense_ids[0, 0]
    # scores stay the dense cosines (lambda of Eq. 5 keeps its meaning), for the chosen items
    cos = dict(zip(dense_ids[0].tolist(), dense_scores[0].tolist()))
    np.testing.assert_allclose(scores[0], [cos[i] for i in ids[0]], rtol=1e-6)
    # rerank <= k, or no prompts: the dense answer
    assert np.array_equal(index.search(q, 3, prompts=[prompt], rerank=3)[0], dense_ids[:, :3])
    assert np.array_equal(index.search(q, 3)[0], dense_ids[:, :3])
    with pytest.raises(ValueError, match="prompts for"):
        index.search(np.concatenate([q, q]), 3, prompts=[prompt], rerank=10)


def test_cached_rows_come_back_float32_with_the_stored_fp16_values(built):
    """The arrays are stored fp16; ``h()``, ``latents()``, ``text_embeddings()`` and
    ``lookup()`` return float32 as their docstrings say (the ONNX graphs take float32), with
    the stored values exactly, in the order and shape of the ids asked for."""
    _, _, out = built
    index = RetrievalIndex.load(out, verify=False)
    ids = np.array([[5, 0, 5], [299, 17, 0]])
    for name, get in (("h", index.h), ("latents", index.latents),
                      ("text", index.text_embeddings)):
        rows = get(ids)
        stored = np.load(out / f"{name}.f16.npy")
        assert rows.dtype == np.float32, name
        assert rows.shape == (2, 3, *stored.shape[1:]), name
        assert np.array_equal(rows, stored[ids].astype(np.float32)), name
    nb = index.lookup(ids, np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], np.float64))
    assert nb.h.dtype == nb.latents.dtype == nb.scores.dtype == np.float32
    assert np.array_equal(nb.h, index.h(ids)) and np.array_equal(nb.latents, index.latents(ids))


def test_republishing_an_index_leaves_a_whole_one_at_every_filesystem_step(built, tmp_path,
                                                                           monkeypatch):
    """The deterministic form of the reader race above: while a rebuilt index is published
    over an existing one, a reader opens the index after every filesystem change the publish
    makes (rename, replace, symlink, unlink, rmdir, mkdir: whatever it uses) and must find a
    whole index each time, the old one (10 items) until one step switches to the new one (20
    items). The version a reader resolved just before stays loadable until the next publish."""
    import os

    from imageragturbo.retriever import build as rbuild

    pairs, enc, _ = built
    idx = tmp_path / "idx"
    build_index(pairs[:10], enc, idx, progress=False)
    before = idx.resolve()
    seen: list[tuple[str, int | str]] = []
    state = {"on": False}

    def look(step: str) -> None:
        state["on"] = False  # the reader's own file operations are not steps
        try:
            seen.append((step, len(RetrievalIndex.load(idx))))
        except Exception as e:  # noqa: BLE001 - any failure is the bug under test
            seen.append((step, repr(e)))
        state["on"] = True

    def checked(name):
        real = getattr(os, name)

        def op(*args, **kwargs):
            out = real(*args, **kwargs)
            if state["on"]:
                look(f"{name}({', '.join(map(str, args[:2]))})")
            return out
        return op

    for name in ("rename", "replace", "symlink", "unlink", "remove", "rmdir", "mkdir", "link"):
        monkeypatch.setattr(os, name, checked(name))
    real_publish = rbuild.publish

    def publish(built_dir, out, **kw):
        look("before publish")
        try:
            real_publish(built_dir, out, **kw)
        finally:
            state["on"] = False
        look("after publish")

    monkeypatch.setattr(rbuild, "publish", publish)
    build_index(pairs[:20], enc, idx, overwrite=True, progress=False)
    monkeypatch.undo()

    sizes = [s for _, s in seen]
    assert len(seen) >= 4, seen                        # the publish's steps were observed
    assert all(s in (10, 20) for s in sizes), [x for x in seen if x[1] not in (10, 20)]
    switch = sizes.index(20)
    assert sizes[:switch] == [10] * switch and sizes[switch:] == [20] * (len(sizes) - switch)
    assert switch >= 1                                 # old until the switch, new from it on
    assert len(RetrievalIndex.load(before)) == 10      # a reader's resolved version survives
    build_index(pairs[:10], enc, idx, overwrite=True, progress=False)
    assert not before.exists()                         # until the next publish
    assert len(RetrievalIndex.load(idx)) == 10


def test_sampled_neighbours_follow_the_seed_and_stay_in_the_pool(built):
    from imageragturbo.runtime import request

    _, enc, out = built
    index = RetrievalIndex.load(out, verify=False)
    prompts = ["w1 w2 w3 w4", "w5 w6 w7 w8"]
    q = enc.encode_text(prompts)
    top, _ = index.search(q, 8, prompts=prompts, rerank=32)
    picks = {}
    for seed in range(12):
        _, _, nb = request.retrieve(index, q, 2, prompts, 32, [seed, seed], pool=4)
        assert nb.ids.shape == (2, 2) and nb.latents is None  # the request path reads h only
        for b in range(2):
            assert set(nb.ids[b]) <= set(top[b]) and len(set(nb.ids[b])) == 2
            # best-first order kept among the drawn ones
            assert list(top[b]).index(nb.ids[b, 0]) < list(top[b]).index(nb.ids[b, 1])
        picks[seed] = nb.ids.copy()
        again = request.retrieve(index, q, 2, prompts, 32, [seed, seed], pool=4)[2]
        assert np.array_equal(again.ids, nb.ids)                  # a seed: always the same
    assert len({tuple(p[0]) for p in picks.values()}) > 3          # seeds: other neighbours
    # pool 1 or no seeds: the plain top k
    for kw in ({"pool": 1}, {"pool": 4, "seeds": None}):
        seeds = kw.pop("seeds", [0, 0])
        ids = request.retrieve(index, q, 2, prompts, 32, seeds, **kw)[2].ids
        assert np.array_equal(ids, top[:, :2])
    with pytest.raises(ValueError, match="pool"):
        request.retrieve(index, q, 2, prompts, 32, [0, 0], pool=0)
    with pytest.raises(ValueError, match="seeds for"):
        request.sample_neighbours(top, top.astype(np.float32), 2, [0])


def test_the_retriever_backend_gives_the_in_process_neighbours(built, monkeypatch):
    """model_repository/retriever/1/model.py, driven without a server: for the same prompts,
    seeds and settings (re-ranking, seeded pool) its outputs are runtime.retrieve's."""
    import importlib.util

    from backend_stub import pb_utils_stub

    from imageragturbo.runtime import request

    _, enc, out = built
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils_stub())
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "retriever_backend_under_test", root / "model_repository/retriever/1/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.index = RetrievalIndex.load(out, verify=False)
    m.has_adapter, m.h_shape, m.rerank, m.pool = True, (6, 1, 1), 32, 3
    m.start = None
    m.dtypes = {"h_retr": np.float32, "lam": np.float32, "slerp_w": np.float32,
                "start": np.float32, "start_t": np.int64,
                "NEIGHBOUR_IDS": np.object_, "NEIGHBOUR_CAPTIONS": np.object_,
                "NEIGHBOUR_SCORES": np.float32}
    prompts, seeds = ["w1 w2 w3", "w9 w8 w7"], [11, 12]
    q = enc.encode_text(prompts)
    z_t = request.initial_noise(seeds, m.index.latents(np.array([0])).shape[1:])
    req = {"pooled": q, "k": np.full((2, 1), 2, np.int32),
           "strength": np.full((2, 1), np.nan, np.float32),
           "prompt": np.array([p.encode() for p in prompts], np.object_).reshape(2, 1),
           "seed": np.array(seeds, np.int64).reshape(2, 1),
           "sample": z_t, "timestep": np.full((2, 1), 999, np.int64)}
    (resp,) = m.execute([req])
    assert resp.error is None, resp.error and resp.error.message
    # the paper's model: the step starts from z_T at t, passed through
    np.testing.assert_array_equal(resp.outputs["start"], z_t)
    assert resp.outputs["start_t"].tolist() == [[999], [999]]
    h, scores, nb = request.retrieve(m.index, q, 2, prompts, 32, seeds, 3)
    assert not np.array_equal(nb.ids, request.retrieve(m.index, q, 2, prompts, 32)[2].ids)
    np.testing.assert_array_equal(resp.outputs["h_retr"], h)
    np.testing.assert_array_equal(resp.outputs["NEIGHBOUR_SCORES"], scores)
    assert resp.outputs["NEIGHBOUR_IDS"].tolist() == [[i.encode() for i in r]
                                                      for r in nb.item_ids]
    np.testing.assert_allclose(resp.outputs["lam"][:, 0], scores[:, 0])
    np.testing.assert_array_equal(resp.outputs["slerp_w"][:, 0], [1, 1])  # no slerp here
    assert {a.dtype for a in resp.outputs.values()} == {np.dtype(np.float32),
                                                        np.dtype(np.int64), np.dtype(np.object_)}
    # a neighbour-start model: from the (seed-drawn) top-1 neighbour's latent, noised with z_T
    m.start = {"timestep": 479, "alpha_bar": 0.25}
    (resp,) = m.execute([req])
    lat = m.index.latents(nb.ids[:, 0]).astype(np.float32)
    np.testing.assert_allclose(resp.outputs["start"], 0.5 * lat + np.sqrt(0.75) * z_t,
                               rtol=1e-6, atol=1e-6)
    assert resp.outputs["start_t"].tolist() == [[479], [479]]
    # K = 0 asks for nothing: z_T at t again, whatever the model
    (resp,) = m.execute([{**req, "k": np.zeros((2, 1), np.int32)}])
    np.testing.assert_array_equal(resp.outputs["start"], z_t)
    assert resp.outputs["start_t"].tolist() == [[999], [999]]
