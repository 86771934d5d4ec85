"""The model's default retrieval index over the ShapesWorld retrieval split, built when
missing and rebuilt when the model's weights changed since: what ``serve``, ``train adapter``
and the evaluations use when no index is given.

The caller hands in ``load_encoder`` (for a model name or folder, its
``RetrievalEncoder``: ``imageragturbo.model.load_retrieval_encoder``), so this package needs
no torch and imports nothing above it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, index_dir_of, model_files_id, rebuild_needed

from .build import build_index
from .index import RetrievalEncoder
from .pairs import shapesworld_pairs


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"index: {msg}", file=sys.stderr, flush=True)


def ensure_index(model: str, index_dir: Path | None = None, data: Path = DATA_ROOT,
                 retrieval_items: int | None = None, quiet: bool = False, *,
                 load_encoder: Callable[[str], RetrievalEncoder]) -> Path:
    """The model's retrieval index over the ShapesWorld retrieval split (built, with the split
    when ``data`` lacks it, the first time, and again when the weights changed since) at
    ``index_dir`` (default ``index_dir_of(model)``); ``load_encoder(model)`` is called only
    to build."""
    out = Path(index_dir) if index_dir else index_dir_of(model)
    manifest = out / "manifest.json"
    if manifest.exists() and not rebuild_needed(
            json.loads(manifest.read_text()).get("model_id"), model_files_id(model, index=True),
            "index", out, index_dir is not None, say=lambda m: _say(m, quiet)):
        return out
    from imageragturbo import shapesworld as sw

    data = Path(data)
    if not (data / "retrieval.jsonl").exists():
        n = retrieval_items or sw.SPLITS["retrieval"].default_count
        if data.exists():
            raise FileNotFoundError(f"{data} has no retrieval split; rebuild it with "
                                    f"`imageragturbo data build --out {data}` or give --data")
        _say(f"rendering the ShapesWorld retrieval split ({n} items) into {data}", quiet)
        sw.build_dataset(data, {"retrieval": n}, progress=not quiet)
    pairs = shapesworld_pairs(data, "retrieval")
    if retrieval_items:
        pairs = pairs[:retrieval_items]
    _say(f"building the retrieval index of {len(pairs)} items with {model}'s encoder in {out}",
         quiet)
    build_index(pairs, load_encoder(model), out, progress=not quiet,
                model_source=str(model), overwrite=True)
    return out
