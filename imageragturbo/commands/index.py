"""The retriever's commands: ``index build``, ``index query``, ``index verify`` and
``bench retrieval``.

Standard library only at module level (the main CLI imports this for ``--help``); numpy,
hnswlib and the model load inside the handlers. The hnswlib flags come from
``retriever.index.HNSWParams`` (``flags``), which owns their defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, index_dir_of

from .flags import add_dataclass_flags, dataclass_from_args


def _cmd_build(args: argparse.Namespace) -> int:
    import os

    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.model.encoder import resolve_device
    from imageragturbo.retriever.build import build_index
    from imageragturbo.retriever.index import HNSWParams
    from imageragturbo.retriever.pairs import read_pairs, shapesworld_pairs

    device, rank, world, barrier = str(resolve_device(args.device)), 0, 1, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # under `accelerate launch`
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        rank, world, barrier = state.process_index, state.num_processes, state.wait_for_everyone
        device = str(state.device)
    pairs = read_pairs(args.pairs) if args.pairs else shapesworld_pairs(args.data, args.split)
    if args.limit is not None:
        pairs = pairs[:args.limit]
    encoder = (load_retrieval_encoder(args.model) if device == "cpu" else
               load_retrieval_encoder(args.model, device))
    out = build_index(pairs, encoder, args.out or index_dir_of(args.model),
                      params=dataclass_from_args(HNSWParams, args),
                      batch_size=args.batch_size, threads=args.threads,
                      resume=not args.restart, overwrite=args.overwrite,
                      progress=not args.quiet and rank == 0, model_source=args.model,
                      rank=rank, world=world, barrier=barrier)
    if out is None:                                   # not the main process: it publishes
        return 0
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "count": manifest["count"],
                      "model_id": manifest["model_id"], "shapes": manifest["shapes"],
                      "hnsw": manifest["hnsw"], "seconds": manifest["build"]["seconds"],
                      "bytes": sum(f["bytes"] for f in manifest["files"].values())}, indent=2))
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever.index import RetrievalIndex

    args.index = args.index or index_dir_of(args.model or DEFAULT_MODEL)
    index = RetrievalIndex.load(args.index, ef=args.ef, verify=args.verify)
    model = args.model or index.manifest.get("model_source") or DEFAULT_MODEL
    encoder = load_retrieval_encoder(model)
    if str(encoder.model_id) != index.model_id:
        raise ValueError(f"index {args.index} was built with model {index.model_id!r}; "
                         f"--model {model} gives {encoder.model_id!r}")
    nb = index.query(args.prompts, encoder, args.k)
    if args.json:
        print(json.dumps([
            {"prompt": p, "neighbours": [
                {"rank": r + 1, "row": int(i), "id": iid, "score": round(float(s), 4),
                 "caption": c, "image": im}
                for r, (i, iid, s, c, im) in enumerate(zip(
                    nb.ids[b], nb.item_ids[b], nb.scores[b], nb.captions[b], nb.images[b]))]}
            for b, p in enumerate(args.prompts)], indent=2))
        return 0
    for b, p in enumerate(args.prompts):
        print(f"query: {p}")
        for r in range(nb.ids.shape[1]):
            print(f"  {r + 1:2d}. {nb.scores[b, r]:.4f}  {nb.item_ids[b][r]:>16s}  "
                  f"{nb.captions[b][r]}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from imageragturbo.retriever.index import verify_index

    args.index = args.index or index_dir_of(args.model)
    res = verify_index(args.index, progress=not args.quiet)
    print(json.dumps({**res, "ok": True}) if args.json else
          f"{res['index']}: ok ({res['count']} items, {res['files']} files, "
          f"{res['bytes'] / 2**30:.2f} GiB checked in {res['seconds']:.1f} s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from imageragturbo.retriever.bench import run_retrieval_bench

    res = run_retrieval_bench(
        args.n, args.dim, queries=args.queries, exact_queries=args.exact_queries,
        M=args.M, ef_construction=args.ef_construction, ef=args.ef, threads=args.threads,
        seed=args.seed, scann=not args.no_scann, progress=not args.json,
        data={"clusters": args.clusters, "intrinsic_dim": args.intrinsic_dim,
              "spread": args.spread, "noise": args.noise})
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"N={res['n']} D={res['dim']} queries={res['queries']} "
          f"(build threads {res['build_threads']}, query threads 1)")
    print(f"{'':8s} {'build s':>9s} {'MiB':>9s} {'p50 ms':>9s} {'p99 ms':>9s} "
          f"{'R@1':>7s} {'R@10':>7s}")
    for name in ("hnsw", "exact", "scann"):
        if name in res:
            r = res[name]
            print(f"{name:8s} {r['build_seconds']:9.2f} {r['index_bytes'] / 2**20:9.1f} "
                  f"{r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['recall@1']:7.4f} "
                  f"{r['recall@10']:7.4f}")
    print(f"exact method: {res['exact']['method']}; peak RSS "
          f"{res['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


HNSW_HELP = {
    "M": "hnswlib links per node",
    "ef_construction": "hnswlib build beam width",
    "ef": "hnswlib query beam width (raised to k when k is larger)",
}


def _hnsw_args(p: argparse.ArgumentParser) -> None:
    from imageragturbo.retriever.index import HNSWParams

    add_dataclass_flags(p, HNSWParams, HNSW_HELP)


def add_parsers(sub, bench) -> None:
    """Add ``index {build,query}`` to the top-level subparsers ``sub`` and ``retrieval`` to
    the ``bench`` group's subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    idx = sub.add_parser(
        "index", help="the retrieval database: build it, query it, verify it",
        description="The retrieval database (paper, Sec. 4.1): text-image pairs keyed by the "
                    "pipeline's own pooled, L2-normalised text embedding in an hnswlib "
                    "inner-product index, with each item's VAE latent and H-space features "
                    "(UNet encoder at t=0) cached as fp16 memory maps.")
    isub = idx.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = isub.add_parser(
        "build", help="encode text-image pairs and write an index folder",
        description="Encode pairs with the model's text encoder, VAE and UNet encoder, and "
                    "write an index folder (manifest.json with sizes and sha256 of every "
                    "file, index.hnsw, text/latents/h as fp16 .npy, items.jsonl). The build "
                    "writes <out>.partial and renames it into place at the end; run the same "
                    "command again after an interruption and it resumes.",
        formatter_class=fmt)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--pairs", type=Path, default=None,
                     help="your own pairs: .jsonl (caption, image, optional id per line) or "
                          ".parquet (needs pyarrow); image paths relative to the file")
    src.add_argument("--data", type=Path, default=DATA_ROOT,
                     help="a ShapesWorld folder from `imageragturbo data build`")
    b.add_argument("--split", default="retrieval", help="ShapesWorld split to index")
    b.add_argument("--out", type=Path, default=None,
                   help=f"index folder to write (default {index_dir_of('<model name>')}, the "
                        "index `serve` uses)")
    b.add_argument("--model", default=DEFAULT_MODEL,
                   help="model name (e.g. tiny-shapes) or diffusers folder")
    b.add_argument("--batch-size", type=int, default=64, help="pairs per encoder batch")
    b.add_argument("--device", default="cpu",
                   help="where the text encoder, VAE and UNet encoder run: cpu, cuda, cuda:N "
                        "or auto (CUDA when there is one); under `accelerate launch` each "
                        "process encodes its share of the batches on its own GPU")
    b.add_argument("--limit", type=int, default=None, help="index only the first N pairs")
    b.add_argument("--threads", type=int, default=None,
                   help="hnswlib build threads (default: all CPUs)")
    _hnsw_args(b)
    b.add_argument("--overwrite", action="store_true", help="replace an existing index")
    b.add_argument("--restart", action="store_true",
                   help="discard a partial build instead of resuming it")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_build)

    q = isub.add_parser(
        "query", help="print the nearest pairs of prompts, with captions and scores",
        description="Encode each prompt with the index's model and print its k nearest "
                    "items (cosine similarity of pooled text embeddings, best first).",
        formatter_class=fmt)
    q.add_argument("prompts", nargs="+", help="one or more prompts")
    q.add_argument("-k", type=int, default=5, help="neighbours per prompt")
    q.add_argument("--index", type=Path, default=None,
                   help=f"index folder (default {index_dir_of('<model name>')})")
    q.add_argument("--model", default=None,
                   help="model name or folder (default: the one the index was built with)")
    q.add_argument("--ef", type=int, default=None, help="query beam (default: the manifest's)")
    q.add_argument("--verify", action="store_true",
                   help="also check the sha256 of every index file (reads the whole index; "
                        "without it the structure is checked: sizes, shapes, counts, dtypes)")
    q.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)  # the default now
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_query)

    v = isub.add_parser(
        "verify", help="check an index completely: structure and every file's sha256",
        description="Check an index folder against its manifest: the structure (format "
                    "version, file sizes, the arrays' dtypes, shapes and counts; what every "
                    "load checks) and then the sha256 of every file, which reads the whole "
                    "index (124 GB at the paper's 0.63M items), with a progress bar. Exit "
                    "code 0 when it is whole, 2 with the files that differ otherwise. Run it "
                    "where an index arrives by other means than `index build` (a sync from "
                    "object storage, a copy by hand); publishing and `serve --link copy` "
                    "check the digests themselves.",
        formatter_class=fmt)
    v.add_argument("index", type=Path, nargs="?", default=None,
                   help=f"index folder (default {index_dir_of('<model name>')})")
    v.add_argument("--model", default=DEFAULT_MODEL,
                   help="whose default index to check when no folder is given")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=_cmd_verify)

    r = bench.add_parser(
        "retrieval", help="hnswlib vs exact search (vs ScaNN if installed): latency, recall",
        description="Synthetic clustered unit vectors (a Gaussian mixture on a low-dim "
                    "subspace plus isotropic noise; queries are fresh draws). Reports build "
                    "seconds, index bytes, single-query single-threaded p50/p99 latency and "
                    "recall@1/@10 against exact search, for hnswlib, exact search (faiss "
                    "IndexFlatIP if importable, else numpy) and ScaNN when importable. "
                    "The paper's database: --n 630000 --dim 1024.",
        formatter_class=fmt)
    r.add_argument("--n", type=int, default=100_000, help="database vectors")
    r.add_argument("--dim", type=int, default=1024, help="vector dimension")
    r.add_argument("--queries", type=int, default=1000, help="held-out queries")
    r.add_argument("--exact-queries", type=int, default=100,
                   help="queries timed for exact search")
    r.add_argument("--threads", type=int, default=None, help="build threads (default: CPUs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--clusters", type=int, default=1024, help="mixture components")
    r.add_argument("--intrinsic-dim", type=int, default=64, help="dimension of the subspace")
    r.add_argument("--spread", type=float, default=0.6, help="within-cluster std (centres: 1)")
    r.add_argument("--noise", type=float, default=0.1,
                   help="share of each vector's energy that is isotropic noise")
    r.add_argument("--no-scann", action="store_true", help="skip ScaNN even if importable")
    _hnsw_args(r)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_cmd_bench)
