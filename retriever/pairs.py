"""Where a retrieval database's text-image pairs come from: a ShapesWorld split, or a user's
JSONL / Parquet file; images are loaded only when the index is built."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """One text-image pair of a retrieval database; ``image`` is an absolute path."""

    id: str
    caption: str
    image: str


def shapesworld_pairs(root: str | os.PathLike, split: str = "retrieval") -> list[Pair]:
    """The pairs of a ShapesWorld split written by ``imageragturbo data build``."""
    from imageragturbo import shapesworld as sw

    root = Path(root)
    return [Pair(str(r["id"]), str(r["caption"]), str((root / r["image"]).resolve()))
            for r in sw.load_manifest(root, split)]


def read_pairs(path: str | os.PathLike, id_prefix: str = "") -> list[Pair]:
    """A user's pairs: JSONL (one ``{"caption", "image", "id"?}`` per line) or Parquet (same
    columns; needs pyarrow). Relative image paths are taken from the file's folder; a missing
    id becomes ``id_prefix`` + the row number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pairs file {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or convert the pairs to JSONL") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: pairs must be .jsonl or .parquet, not {suffix or 'no suffix'!r}")
    pairs = []
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("caption"), str) \
                or not isinstance(r.get("image"), str):
            raise ValueError(f"{path}: row {n} needs string 'caption' and 'image' fields")
        image = Path(r["image"])
        image = image if image.is_absolute() else path.parent / image
        pid = str(r["id"]) if "id" in r else f"{id_prefix}{n}"
        pairs.append(Pair(pid, r["caption"], str(image.resolve())))
    return pairs


def load_image(path: str):
    """An index item's image in RGB, EXIF orientation applied and transparency on white
    (``imageragturbo.images.to_rgb``), as training reads its images."""
    from PIL import Image

    from imageragturbo.images import to_rgb

    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} of the retrieval pairs does not exist")
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


