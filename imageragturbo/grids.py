"""PNG sheets of images with their prompts: one helper for the data grids, the evaluation
grids and the comparison sheets (``caption_grid``: a grid with a caption under each image;
``row_grid``: one labelled row per method, one column per prompt)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def caption_grid(images: Sequence[np.ndarray], captions: Sequence[str],
                 path: str | os.PathLike, cols: int = 6, tile: int = 128) -> Path:
    """A PNG grid of uint8 images (H, W, 3), each shown at ``tile`` pixels (nearest
    neighbour, so a 64x64 image's pixels stay visible), with its caption underneath."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    rows = math.ceil(len(images) / cols)
    text_h, pad = 40, 6
    sheet = Image.new("RGB", (cols * (tile + pad), rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(k, cols)
        x0, y0 = c * (tile + pad), r * (tile + text_h)
        pic = Image.fromarray(np.asarray(img, dtype=np.uint8))
        if pic.size != (tile, tile):
            pic = pic.resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(pic, (x0, y0))
        for j, line in enumerate(wrap(cap, 24)[:3]):
            draw.text((x0 + 3, y0 + tile + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def row_grid(rows: dict[str, Sequence[np.ndarray]], captions: Sequence[str],
             path: str | os.PathLike, tile: int = 128, label_w: int = 110) -> Path:
    """A PNG comparison sheet: one labelled row per method (uint8 images, one per column),
    one column per prompt, the prompt under each column."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    n = len(captions)
    text_h, pad = 40, 4
    sheet = Image.new("RGB", (label_w + n * (tile + pad), len(rows) * (tile + pad) + text_h),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, imgs) in enumerate(rows.items()):
        y = r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0), font=font)
        for c, img in enumerate(imgs):
            pic = Image.fromarray(np.asarray(img, dtype=np.uint8))
            sheet.paste(pic.resize((tile, tile), Image.Resampling.NEAREST),
                        (label_w + c * (tile + pad), y))
    y = len(rows) * (tile + pad)
    for c, p in enumerate(captions):
        for j, line in enumerate(wrap(p, 22)[:3]):
            draw.text((label_w + c * (tile + pad) + 2, y + 12 * j), line, fill=(0, 0, 0),
                      font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines
