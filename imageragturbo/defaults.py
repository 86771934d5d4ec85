"""Names, places and identities every part agrees on, in the standard library only, so that
the request path (``serve``, the Triton backends, the SDK's CLI) can use them without torch.

- ``DEFAULT_MODEL`` and ``VARIANTS``: the shipped default model variant, a diffusers folder
  inside the package; ``resolve`` turns a variant name or a folder path into the folder. (The
  served Triton ensemble's name is another thing: ``client.contract.ENSEMBLE_NAME``.)
- ``LORA_DIR``: where ImageRAGTurbo's decoder LoRA lives in a model folder.
- ``STUDENT_TIMESTEP``: the one step of SD-Turbo and the tiny student (t = 999).
- ``export_dir_of`` / ``index_dir_of``: where an export and a retrieval index of a model go by default.
- ``to_unit`` / ``from_unit``: pixel values [0, 255] <-> the VAE's [-1, 1] (arithmetic only, so
  they work on NumPy arrays and torch tensors alike; rounding and clipping stay with the caller).
- ``files_identity``: '<folder name>:<12 hex>' over the weights and configs of some of a
  model folder's parts: ``INDEX_PARTS`` (what an index caches: text encoder, VAE, UNet; the
  decoder LoRA leaves the UNet encoder's output unchanged) or ``SERVED_PARTS`` (what an export
  is made of: those plus the H-adapter and the decoder LoRA). ``model_files_id`` names a
  variant's or folder's; ``rebuild_needed`` compares the one an export or index records.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

DEFAULT_MODEL = "tiny-shapes"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VARIANTS = {DEFAULT_MODEL: WEIGHTS_DIR / DEFAULT_MODEL}
LORA_DIR = "unet_lora"

# Hybrid retrieval: the dense (text-embedding) top RERANK_CANDIDATES re-ordered by the share of
# the prompt's words and word pairs in each caption (retriever.index.lexical_overlap); 0: dense
# only. On the first shipped tiny-shapes' index, the top-1 neighbour's own render scored
# ShapesTIFA 0.781 dense and 0.831 re-ranked from the top 32 (300 evaluation prompts).
RERANK_CANDIDATES = 32
STUDENT_TIMESTEP = 999  # SD-Turbo's single step (EulerDiscrete, trailing spacing): t = 999
ONNX_ROOT = Path("runs/onnx")          # exports: runs/onnx/<model name>
INDEX_ROOT = Path("data/index")        # indexes: data/index/shapesworld-<model name>
DATA_ROOT = Path("data/shapesworld")   # the generated ShapesWorld data set (all splits)
PIXEL_HALF = 127.5                     # uint8 [0, 255] <-> [-1, 1]

INDEX_PARTS = ("text_encoder", "vae", "unet")
SERVED_PARTS = INDEX_PARTS + ("h_adapter", LORA_DIR)


def model_name(model: str | Path) -> str:
    """The short name of a variant or a folder (for default paths)."""
    return Path(str(model)).name or "model"


def export_dir_of(model: str | Path) -> Path:
    """The default ONNX export folder of a model: runs/onnx/<model name>."""
    return ONNX_ROOT / model_name(model)


def index_dir_of(model: str | Path) -> Path:
    """The default retrieval index of a model: data/index/shapesworld-<model name> (an index
    caches one model's features, so each model has its own)."""
    return INDEX_ROOT / f"shapesworld-{model_name(model)}"


def to_unit(pixels):
    """[0, 255] pixel values -> [-1, 1] (the VAE's range)."""
    return pixels / PIXEL_HALF - 1.0


def from_unit(x):
    """[-1, 1] -> [0, 255] (unrounded, unclipped)."""
    return (x + 1.0) * PIXEL_HALF


def resolve(model: str | Path) -> Path:
    """A variant name or a folder path -> the folder, with a clear error if it is missing."""
    path = VARIANTS.get(str(model), Path(model))
    if not path.is_dir():
        known = ", ".join(VARIANTS)
        hint = (" (train it with `imageragturbo train base`)" if str(model) in VARIANTS else "")
        raise FileNotFoundError(f"model {model!r} not found at {path}{hint}; give a variant "
                                f"name ({known}) or a local diffusers folder")
    return path


def files_identity(path: Path, parts: tuple[str, ...] = INDEX_PARTS) -> str:
    """'<folder name>:<12 hex>' from the weights and configs of the subfolders ``parts``
    (missing subfolders add nothing, so a folder without an adapter keeps its identity).
    Start-up asks it several times (export, index, training check each read every weight), so
    the digest is kept per process while no file's inode, size or modification time changes;
    files modified in the last 2 s are always read again, since a rewrite within the clock's
    granularity would keep the time (git's "racily clean" rule)."""
    base = Path(path).resolve()
    files = []
    for sub in parts:
        for f in sorted((base / sub).glob("*")):
            if f.suffix in (".safetensors", ".json", ".bin"):
                st = f.stat()
                files.append((f, st.st_ino, st.st_size, st.st_mtime_ns))
    fresh = any(time.time_ns() - m < 2_000_000_000 for *_, m in files)
    digest = (_files_digest.__wrapped__ if fresh else _files_digest)(tuple(files))
    return f"{Path(path).name}:{digest}"


@functools.lru_cache(maxsize=32)
def _files_digest(files: tuple[tuple[Path, int, int, int], ...]) -> str:
    h = hashlib.sha256()
    for f, *_ in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def model_files_id(source, index: bool = False) -> str | None:
    """The weight files' identity of a variant name or folder (None when not a folder): of
    everything an export is made of, or with ``index`` of the parts an index caches."""
    if source is None:
        return None
    try:
        return files_identity(resolve(source), INDEX_PARTS if index else SERVED_PARTS)
    except FileNotFoundError:
        return None


def rebuild_needed(recorded: str | None, current: str | None, what: str, path: Path,
                   explicit: bool, say=None) -> bool:
    """True when ``path`` (an export or index: ``what``) was made from other weights
    (``recorded``, a ``model_files_id``) than the model's ``current`` ones and should be
    rebuilt (``say`` is told so); a folder the user named (``explicit``) is never rebuilt
    behind their back: ValueError."""
    if current is None or recorded == current:
        return False
    if explicit and recorded is None:
        return False  # exported from in-memory components: nothing to compare
    if explicit:
        raise ValueError(f"{what} {path} was made from other weights ({recorded}) than "
                         f"{current}; remove it or give another folder")
    if say is not None:
        say(f"the model's weights changed since {what} {path} was made; rebuilding it")
    return True
