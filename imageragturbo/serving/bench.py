"""``imageragturbo bench serve``: the served ensemble under load (tritonclient.grpc.aio; there
is no perf_analyzer here) against the in-process ONNX Runtime pipeline, in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time

import numpy as np

PROMPTS = ("a red circle in the top left corner", "two blue squares",
           "a small green triangle left of a yellow circle", "a purple square in the middle")


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def in_process_latency(export_dir, index_dir, k: int, threads: int, repeats: int,
                       warmup: int) -> dict:
    """The same request in process: tokenize, text encoder, retrieval, one step, uint8."""
    from imageragturbo import runtime

    pipe = runtime.OnnxPipeline(export_dir, providers=runtime.choose_providers(["cpu"]),
                                threads=threads)
    index = runtime.load_index(index_dir, int(pipe.manifest["text_dim"]), pipe.h_shape)
    times = []
    for i in range(warmup + repeats):
        p = [PROMPTS[i % len(PROMPTS)]]
        t0 = time.perf_counter()
        if k > 0:
            _, pooled = pipe.encode_prompt(p)
            h_retr, scores, _ = runtime.retrieve(index, pooled, k)
            lam, w = runtime.retrieval_controls(scores, None, pipe.has_adapter)
            pipe.generate(p, [i], h_retr=h_retr, lam=lam, slerp_w=w)
        else:
            pipe.generate(p, [i])
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": round(_pct(times, 50), 3), "p99_ms": round(_pct(times, 99), 3),
            "repeats": repeats}


async def _load(url: str, concurrency: int, requests: int, warmup: int, k: int) -> dict:
    from imageragturbo.client import AsyncImageRAGTurboClient

    async with AsyncImageRAGTurboClient(url, timeout=120) as client:
        for i in range(warmup):
            await client.generate(PROMPTS[i % len(PROMPTS)], seed=i, k=k)
        lat: list[float] = []
        counter = iter(range(requests))

        async def worker():
            for i in counter:
                t0 = time.perf_counter()
                await client.generate(PROMPTS[i % len(PROMPTS)], seed=i, k=k)
                lat.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests,
            "p50_ms": round(_pct(lat, 50), 3), "p99_ms": round(_pct(lat, 99), 3),
            "images_per_s": round(requests / wall, 2)}


def bench_serve(args: argparse.Namespace) -> dict:
    from .assets import prepare
    from .repository import RenderOptions
    from .session import running_server

    for c in args.concurrency:
        if c < 1:
            raise ValueError(f"concurrency must be >= 1, got {c}")
    if args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    assets = prepare(args.model, args.export, args.index, args.data,
                     random_weights=args.random_weights, retrieval_items=args.retrieval_items,
                     quiet=args.quiet or args.json)
    quiet = args.quiet or args.json
    if not quiet:
        print("bench: in-process ONNX Runtime pipeline", file=sys.stderr)
    inproc = in_process_latency(assets.export_dir, assets.index_dir, args.k, args.threads,
                                max(20, args.requests // 2), 3)
    opts = RenderOptions(max_batch_size=args.max_batch_size, threads=args.threads,
                         queue_delay_us=args.queue_delay_us,
                         max_queue_size=max(64, 4 * max(args.concurrency)))
    cm = (contextlib.nullcontext(None) if args.url else
          running_server(assets, opts, ready_timeout=args.ready_timeout, quiet=quiet))
    serving = []
    with cm as server:
        url = args.url or server.url
        for c in args.concurrency:
            if not quiet:
                print(f"bench: {args.requests} requests at concurrency {c}", file=sys.stderr)
            serving.append(asyncio.run(_load(url, c, args.requests, args.warmup, args.k)))
    c1 = next((s for s in serving if s["concurrency"] == 1), serving[0])
    return {
        "model": str(args.model if not args.random_weights else "tiny-random"),
        "export": str(assets.export_dir), "k": args.k, "threads_per_stage": args.threads,
        "max_batch_size": args.max_batch_size, "queue_delay_us": args.queue_delay_us,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "in_process": inproc, "serving": serving,
        "overhead_ratio_p50": round(c1["p50_ms"] / inproc["p50_ms"], 2),
        "load_generator": "tritonclient.grpc.aio via imageragturbo.client",
    }


def format_table(res: dict) -> str:
    lines = [f"{'':22s} {'p50 ms':>9s} {'p99 ms':>9s} {'img/s':>8s}",
             f"{'in-process (batch 1)':22s} {res['in_process']['p50_ms']:9.2f} "
             f"{res['in_process']['p99_ms']:9.2f} {1e3 / res['in_process']['p50_ms']:8.1f}"]
    for s in res["serving"]:
        lines.append(f"{'served, concurrency ' + str(s['concurrency']):22s} {s['p50_ms']:9.2f} "
                     f"{s['p99_ms']:9.2f} {s['images_per_s']:8.1f}")
    lines.append(f"serving overhead (p50 at concurrency 1 / in-process): "
                 f"{res['overhead_ratio_p50']:.2f}x")
    return "\n".join(lines)
