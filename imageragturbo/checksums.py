"""sha256 of files, for the manifests of data sets, indexes and exports (standard library only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

CHUNK = 1 << 22  # 4 MiB


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK,
                progress: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks; ``progress(n)`` after each chunk of n bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            if progress is not None:
                progress(len(b))
    return h.hexdigest()


def copy_with_sha256(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = CHUNK,
                     progress: Callable[[int], object] | None = None) -> str:
    """Copy the file ``src`` to ``dst`` (created, or truncated), fsync it, and return the hex
    sha256 of the bytes copied: one read of ``src`` both copies and checks it."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while b := fi.read(chunk):
            h.update(b)
            fo.write(b)
            if progress is not None:
                progress(len(b))
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()
