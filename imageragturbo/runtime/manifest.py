"""The export folder's manifest: format constants, reading and checking it. Standard library
only, so the ONNX Runtime pipeline and the CLI can use it without torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from imageragturbo.checksums import sha256_file
from imageragturbo.client.contract import STAGES

FORMAT = "imageragturbo-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def load_manifest(path: str | Path, verify: bool = False) -> dict:
    """Read an export folder's manifest; with ``verify``, check every file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"no ONNX export at {path} (no {MANIFEST}; run `imageragturbo "
                                "export` first)")
    m = json.loads(mpath.read_text())
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    for name, st in m["stages"].items():
        for f, info in st["files"].items():
            fp = path / f
            if not fp.exists():
                raise FileNotFoundError(f"export {path} is missing {f} (stage {name})")
            if fp.stat().st_size != info["bytes"] or (verify and sha256_file(fp) != info["sha256"]):
                raise ValueError(f"{fp} differs from the manifest (size or sha256); export again")
    return m


def stage_names(manifest: dict) -> Sequence[str]:
    return [s for s in STAGES if s in manifest["stages"]]
