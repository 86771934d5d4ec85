"""``imageragturbo bench soak``: a long mixed load against the served ensemble, to find leaks
and wrong answers under time: valid requests (different prompts, seeds and K) and invalid ones
(blank, over-long, NaN strength, K out of range) at a fixed concurrency. Every invalid request
must get INVALID_ARGUMENT and every valid one an image; anything else is an unexpected error.
The resident memory of tritonserver and of each Python-backend stub is read from /proc before
and after, so growth shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from imageragturbo.runtime.latency import PROMPTS
from imageragturbo.stats import percentile

VALID = PROMPTS + ("three cyan stars", "a big yellow square on a plain background")
INVALID = (("   ", {}), ("a" * 5000, {}), ("a red star", {"strength": float("nan")}),
           ("a red star", {"k": 99}))


def process_memory(server) -> dict[str, int]:
    """Resident set size (kB) of ``server``'s tritonserver and of each of its live Python-backend
    stubs ("stub:<model>:<pid>")."""
    def rss(p: int) -> int:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:   # exited since it was listed
            pass
        return 0

    out = {"tritonserver": rss(server.process.pid)}
    for model, pids in server.stub_processes().items():
        out.update({f"stub:{model}:{pid}": rss(pid) for pid in pids})
    return out


async def _soak(url: str, requests: int, concurrency: int, invalid_every: int) -> dict:
    from imageragturbo.client import AsyncImageRAGTurboClient, InvalidInputError
    from imageragturbo.client.sdk import RetryPolicy

    kinds: dict[str, int] = {}
    lat: list[float] = []
    unexpected: list[str] = []
    async with AsyncImageRAGTurboClient(url, timeout=120,
                                        retry=RetryPolicy(max_attempts=1)) as client:
        counter = iter(range(requests))

        async def worker():
            for i in counter:
                bad = invalid_every > 0 and i % invalid_every == invalid_every - 1
                if bad:
                    prompt, kw = INVALID[(i // invalid_every) % len(INVALID)]
                else:
                    prompt, kw = VALID[i % len(VALID)], {"k": i % 4}
                t0 = time.perf_counter()
                try:
                    r = await client.generate(prompt, seed=i, **kw)
                    ok = (not bad) and r.array.ndim == 3 and r.array.dtype == np.uint8
                    kind = "image" if ok else "image for an invalid request"
                except InvalidInputError:
                    kind = "INVALID_ARGUMENT" if bad else "INVALID_ARGUMENT for a valid request"
                except Exception as e:  # noqa: BLE001 - every other outcome is counted
                    kind = type(e).__name__
                    unexpected.append(f"{i}: {type(e).__name__}: {str(e)[:200]}")
                if kind not in ("image", "INVALID_ARGUMENT") and kind not in kinds:
                    unexpected.append(f"{i}: {kind}")
                kinds[kind] = kinds.get(kind, 0) + 1
                if not bad:
                    lat.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"outcomes": kinds, "unexpected": unexpected[:20],
            "unexpected_count": sum(v for k, v in kinds.items()
                                    if k not in ("image", "INVALID_ARGUMENT")),
            "p50_ms": round(percentile(lat, 50), 2) if lat else None,
            "p99_ms": round(percentile(lat, 99), 2) if lat else None,
            "seconds": round(wall, 1), "requests_per_s": round(requests / wall, 1)}


def soak(server, requests: int, concurrency: int, invalid_every: int = 5,
         warmup: int = 32) -> dict:
    """Run the soak against a started ``TritonServer``; memory is read after a warm-up (the
    first requests load code and caches) and at the end."""
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    asyncio.run(_soak(server.url, warmup, min(concurrency, warmup), 0))
    start = process_memory(server)
    res = asyncio.run(_soak(server.url, requests, concurrency, invalid_every))
    end = process_memory(server)
    growth = {k: round(100.0 * (end[k] - v) / v, 1) for k, v in start.items()
              if k in end and v > 0}
    res.update({"requests": requests, "concurrency": concurrency,
                "invalid_every": invalid_every, "rss_kb_start": start, "rss_kb_end": end,
                "rss_growth_percent": growth,
                "max_rss_growth_percent": max(growth.values()) if growth else None})
    return res
