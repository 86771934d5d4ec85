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
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from imageragturbo.runtime.latency import PROMPTS, batch1_ms, in_process_request
from imageragturbo.stats import percentile

if TYPE_CHECKING:
    from .session import Assets


def in_process_latency(export_dir, index_dir, k: int, threads: int, repeats: int,
                       warmup: int, batch: int = 8) -> dict:
    """The same request in process: tokenize, text encoder, retrieval, one step, uint8; at
    batch 1 (latency) and at ``batch`` (throughput, the yardstick for the served ensemble under
    concurrency, which batches dynamically)."""
    from imageragturbo import runtime

    pipe = runtime.OnnxPipeline(export_dir, providers=runtime.choose_providers(["cpu"]),
                                threads=threads)
    index = runtime.load_index(index_dir, int(pipe.manifest["text_dim"]), pipe.h_shape)
    one = in_process_request(pipe, index, k)
    times, batch_times = batch1_ms(one, repeats, warmup), []
    for i in range(warmup + max(3, repeats // batch)):
        prompts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(batch)]
        t0 = time.perf_counter()
        one(prompts, list(range(i * batch, (i + 1) * batch)))
        if i >= warmup:
            batch_times.append(time.perf_counter() - t0)
    return {"p50_ms": round(percentile(times, 50), 3),
            "p99_ms": round(percentile(times, 99), 3),
            "repeats": repeats, "batch": batch,
            "batch_images_per_s": round(batch / float(np.median(batch_times)), 2)}


def _model_stats(url: str) -> dict:
    """Triton's cumulative per-model statistics: requests and nanoseconds spent queued and in
    compute (input, infer, output), for every loaded model."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        stats = c.get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {
            "count": int(inf.get("success", {}).get("count", 0)),
            "executions": int(m.get("execution_count", 0)),
            **{k: int(inf.get(k, {}).get("ns", 0))
               for k in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def breakdown(before: dict, after: dict) -> dict:
    """Per model, between two ``_model_stats`` readings: mean milliseconds a request spent
    queued and in compute input / infer / output, and the mean batch it ran in."""
    rows = {}
    for name, a in after.items():
        b = before.get(name, {})
        n = a["count"] - b.get("count", 0)
        if n <= 0:
            continue
        ex = max(1, a["executions"] - b.get("executions", 0))
        rows[name] = {"requests": n, "mean_batch": round(n / ex, 2),
                      **{f"{k}_ms": round((a[k] - b.get(k, 0)) / n / 1e6, 3)
                         for k in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return rows


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
            "p50_ms": round(percentile(lat, 50), 3), "p99_ms": round(percentile(lat, 99), 3),
            "images_per_s": round(requests / wall, 2)}


async def _bursts(url: str, bursts: int, size: int, k: int) -> dict:
    """``bursts`` times, ``size`` requests sent at once and awaited together: the median and
    the slowest burst, and how many took over 3x the median. This catches what a steady load
    hides: Triton 2.51's batcher now and then holding a queued batch ~500 ms when an instance
    frees up (README, "Serving overhead")."""
    from imageragturbo.client import AsyncImageRAGTurboClient

    async with AsyncImageRAGTurboClient(url, timeout=120) as client:
        await client.generate(PROMPTS[0], seed=0, k=k)
        times = []
        for _ in range(bursts):
            t0 = time.perf_counter()
            await asyncio.gather(*(client.generate(PROMPTS[i % len(PROMPTS)], seed=i, k=k)
                                   for i in range(size)))
            times.append((time.perf_counter() - t0) * 1e3)
    med = percentile(times, 50)
    return {"bursts": bursts, "size": size, "median_ms": round(med, 1),
            "max_ms": round(max(times), 1), "over_3x_median": sum(t > 3 * med for t in times)}


def bench_serve(args: argparse.Namespace, prepare: Callable[[], Assets]) -> dict:
    """``bench serve`` with its flags ``args``; ``prepare()`` gives the export and index (made
    by the command when missing), called once the flags are checked."""
    from .repository import RenderOptions
    from .session import running_server

    for c in args.concurrency:
        if c < 1:
            raise ValueError(f"concurrency must be >= 1, got {c}")
    if args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    assets = prepare()
    quiet = args.quiet or args.json
    if not quiet:
        print("bench: in-process ONNX Runtime pipeline", file=sys.stderr)
    inproc = in_process_latency(assets.export_dir, assets.index_dir, args.k, args.threads,
                                max(20, args.requests // 2), 3, batch=args.max_batch_size)
    opts = RenderOptions(max_batch_size=args.max_batch_size, threads=args.threads,
                         queue_delay_us=args.queue_delay_us,
                         light_queue_delay_us=args.light_queue_delay_us,
                         instances=args.instances or RenderOptions.instances,
                         max_queue_size=max(64, 4 * max(args.concurrency)))
    cm = (contextlib.nullcontext(None) if args.url else
          running_server(assets, opts, ready_timeout=args.ready_timeout, quiet=quiet))
    serving = []
    with cm as server:
        url = args.url or server.url
        for c in args.concurrency:
            if not quiet:
                print(f"bench: {args.requests} requests at concurrency {c}", file=sys.stderr)
            before = _model_stats(url)
            run = asyncio.run(_load(url, c, args.requests, args.warmup, args.k))
            # includes the warm-up requests; Triton counts per model, not per timed request
            run["per_model"] = breakdown(before, _model_stats(url))
            serving.append(run)
        bursts = (asyncio.run(_bursts(url, args.bursts, args.burst_size, args.k))
                  if args.bursts else None)
    c1 = next((s for s in serving if s["concurrency"] == 1), serving[0])
    cmax = max(serving, key=lambda s: s["concurrency"])
    return {
        "model": str(args.model if not args.random_weights else "tiny-random"),
        "export": str(assets.export_dir), "k": args.k, "threads_per_stage": args.threads,
        "max_batch_size": args.max_batch_size, "queue_delay_us": args.queue_delay_us,
        "light_queue_delay_us": args.light_queue_delay_us,
        "instances": opts.instances,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "in_process": inproc, "serving": serving,
        "overhead_ratio_p50": round(c1["p50_ms"] / inproc["p50_ms"], 2),
        "throughput_ratio": round(cmax["images_per_s"] / inproc["batch_images_per_s"], 2),
        "throughput_ratio_concurrency": cmax["concurrency"],
        "load_generator": "tritonclient.grpc.aio via imageragturbo.client",
        **({"bursts": bursts} if bursts else {}),
    }


def format_table(res: dict) -> str:
    lines = [f"{'':22s} {'p50 ms':>9s} {'p99 ms':>9s} {'img/s':>8s}",
             f"{'in-process (batch 1)':22s} {res['in_process']['p50_ms']:9.2f} "
             f"{res['in_process']['p99_ms']:9.2f} {1e3 / res['in_process']['p50_ms']:8.1f}"]
    for s in res["serving"]:
        lines.append(f"{'served, concurrency ' + str(s['concurrency']):22s} {s['p50_ms']:9.2f} "
                     f"{s['p99_ms']:9.2f} {s['images_per_s']:8.1f}")
    ip = res["in_process"]
    lines.append(f"{'in-process (batch ' + str(ip['batch']) + ')':22s} {'':9s} {'':9s} "
                 f"{ip['batch_images_per_s']:8.1f}")
    lines.append(f"serving overhead (p50 at concurrency 1 / in-process): "
                 f"{res['overhead_ratio_p50']:.2f}x; throughput at concurrency "
                 f"{res['throughput_ratio_concurrency']} / in-process batch {ip['batch']}: "
                 f"{res['throughput_ratio']:.2f}x")
    for s in res["serving"]:
        lines.append(f"per model at concurrency {s['concurrency']} (mean ms per request):")
        lines.append(f"  {'model':14s} {'queue':>7s} {'input':>7s} {'infer':>7s} "
                     f"{'output':>7s} {'batch':>6s}")
        for name, r in s.get("per_model", {}).items():
            lines.append(f"  {name:14s} {r['queue_ms']:7.2f} {r['compute_input_ms']:7.2f} "
                         f"{r['compute_infer_ms']:7.2f} {r['compute_output_ms']:7.2f} "
                         f"{r['mean_batch']:6.2f}")
    if "bursts" in res:
        b = res["bursts"]
        lines.append(f"{b['bursts']} bursts of {b['size']} at once: median {b['median_ms']:.0f} "
                     f"ms, slowest {b['max_ms']:.0f} ms, {b['over_3x_median']} over 3x the "
                     "median")
    return "\n".join(lines)
