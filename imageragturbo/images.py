"""A user's images as the model reads them, the same for the index build and for training:
EXIF orientation applied, converted to RGB (greyscale and palette expanded, 16-bit greys
scaled, transparency composited on white), the shorter side resized to the model's
resolution and the centre cropped to a square. An image that cannot be used raises
:class:`BadImage` with a reason, so a caller can skip it and say why.

PIL and numpy only (no torch): the retriever imports it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np

# Reasons a training image is skipped (the run's data report counts them by these names).
MISSING, CORRUPT, TOO_SMALL, NO_CAPTION = "missing", "corrupt", "too small", "no caption"
# Pillow's own guard against decompression bombs (~179 M pixels) stays on: such a file is
# reported as corrupt rather than decoded.


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is one of the names above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; a missing or unreadable file is a :class:`BadImage` (missing)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage(MISSING, f"{path}: {e.strerror or e}") from None


def content_hash(data: bytes) -> str:
    """The content hash that the leakage checks compare: sha256 of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, name: str = "image"):
    """Decode an encoded image completely (a truncated file fails here, not later)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are fine
            im = Image.open(io.BytesIO(data))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(CORRUPT, f"{name}: {type(e).__name__}: {e}") from None
    return im


def to_rgb(im):
    """EXIF orientation applied, then RGB: greyscale and palette expanded, 16-bit and 32-bit
    greys scaled to 8 bits, any transparency (alpha channel, palette or greyscale
    transparency) composited on white."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else a.max()
        im = Image.fromarray(np.clip(np.rint(a / top * 255), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def fit_square(im, size: int):
    """Resize so the shorter side is ``size`` (bicubic, antialiased when shrinking: Pillow's
    default filter), then crop the centre ``size`` x ``size``. A square image is simply
    resized, and one already at ``size`` is returned as it is."""
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        if (nw, nh) != (size, size):
            im = im.crop((left, top, left + size, top + size))
    return im


def normalise(im, size: int, min_side: int = 0) -> np.ndarray:
    """A decoded image as the model reads it: (size, size, 3) uint8. An image whose shorter
    side (after EXIF orientation) is below ``min_side`` is a :class:`BadImage` (too small)."""
    im = to_rgb(im)
    if min(im.size) < min_side:
        raise BadImage(TOO_SMALL, f"{im.size[0]}x{im.size[1]}, shorter side below "
                                  f"{min_side} pixels")
    return np.asarray(fit_square(im, size))
