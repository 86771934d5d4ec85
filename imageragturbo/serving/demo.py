"""``imageragturbo demo``: start the server, draw a few ShapesWorld evaluation prompts through
the SDK without and with retrieval, write one PNG grid, stop the server."""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Assets

SCALE = 3          # 64 px renders are shown at 192 px (nearest neighbour)
COLS = 4           # prompts per row of the grid


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(rows: list[dict], path: Path, k: int) -> Path:
    """rows: {prompt, plain (H, W, 3), retrieved (H, W, 3), neighbours [(caption, score)]}.
    Each cell: the two images side by side, the prompt, then the neighbours' captions."""
    from PIL import Image, ImageDraw

    h, w = rows[0]["plain"].shape[:2]
    iw, ih = w * SCALE, h * SCALE
    pad, line = 10, 15
    wrap = max(20, (2 * iw + pad) // 7)
    texts = []
    for r in rows:
        t = textwrap.wrap(r["prompt"], wrap)[:3]
        nb = [textwrap.shorten(f"{s:.2f}  {c}", wrap, placeholder="...")
              for c, s in r["neighbours"]]
        texts.append((t, nb))
    text_h = max(len(t) * line + (len(nb) + 1) * (line - 2) for t, nb in texts) + pad
    cw, chh = 2 * iw + 3 * pad, ih + 2 * pad + 14 + text_h
    cols = min(COLS, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    title_h = 30
    grid = Image.new("RGB", (cols * cw, title_h + nrows * chh), "white")
    d = ImageDraw.Draw(grid)
    d.text((pad, 8), f"ImageRAGTurbo served by Triton: left without retrieval, right with k={k} "
                     "neighbours (similarity, caption)", fill="black", font=_font(14))
    for i, (r, (t, nb)) in enumerate(zip(rows, texts)):
        x0, y0 = (i % cols) * cw, title_h + (i // cols) * chh
        d.text((x0 + pad, y0 + 2), "no retrieval", fill="gray", font=_font(11))
        d.text((x0 + 2 * pad + iw, y0 + 2), f"retrieval k={k}", fill="gray", font=_font(11))
        for j, img in enumerate((r["plain"], r["retrieved"])):
            im = Image.fromarray(img).resize((iw, ih), Image.NEAREST)
            grid.paste(im, (x0 + pad + j * (iw + pad), y0 + 16))
        y = y0 + 16 + ih + 6
        for s in t:
            d.text((x0 + pad, y), s, fill="black", font=_font(13))
            y += line
        if nb:
            d.text((x0 + pad, y), "retrieved:", fill="gray", font=_font(11))
            y += line - 2
            for s in nb:
                d.text((x0 + pad, y), s, fill=(40, 80, 160), font=_font(11))
                y += line - 2
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_demo(args: argparse.Namespace, prepare: Callable[[], Assets]) -> Path:
    """``demo`` with its flags ``args``; without ``--url``, ``prepare()`` gives the export and
    index to serve (made by the command when missing)."""
    from imageragturbo import shapesworld as sw
    from imageragturbo.client import ImageRAGTurboClient

    from .session import running_server

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1 (the demo shows what retrieval adds), got {args.k}")
    prompts = [it.caption for it in sw.make_split("eval", args.n, args.seed)]
    if args.url:
        server_cm = contextlib.nullcontext(None)
    else:
        server_cm = running_server(prepare(), ready_timeout=args.ready_timeout,
                                   quiet=args.quiet)
    rows = []
    with server_cm as server:
        url = args.url or server.url
        with ImageRAGTurboClient(url, timeout=120) as client:
            client.wait_until_ready(timeout=args.ready_timeout)
            if not args.quiet:
                print(f"demo: generating {len(prompts)} prompts through {url}", file=sys.stderr)
            for start in range(0, len(prompts), 4):
                batch = prompts[start:start + 4]
                seeds = args.seed + start
                plain = client.generate_batch(batch, seeds=seeds, k=0)
                retr = client.generate_batch(batch, seeds=seeds, k=args.k,
                                             strength=args.strength)
                for p, a, b in zip(batch, plain, retr):
                    rows.append({"prompt": p, "plain": a.array, "retrieved": b.array,
                                 "neighbours": [(n.caption, n.score) for n in b.neighbours]})
    return draw_grid(rows, Path(args.output), args.k)
