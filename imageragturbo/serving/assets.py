"""What a server needs on disk: the ONNX export and the retrieval index of one model, made
once when missing (export via ``export_from_model``; index from the ShapesWorld retrieval
split via the retriever with the model's own encoder)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, VARIANTS, export_dir_of, index_dir_of

DEFAULT_RUNS = Path("runs/serve")
RANDOM_MODEL = "tiny-random"


@dataclass
class Assets:
    model: str            # variant name or folder the export and index come from
    export_dir: Path
    index_dir: Path


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"serve: {msg}", file=sys.stderr, flush=True)


def model_folder(model: str, random_weights: bool = False, runs: Path = DEFAULT_RUNS,
                 seed: int = 0, quiet: bool = False) -> str:
    """The model to serve: a variant name / folder, checked to exist; or with
    ``random_weights`` the default tiny architecture with random weights saved once as a
    diffusers folder under ``runs`` (for trying the stack before tiny-shapes is trained)."""
    if random_weights:
        folder = runs / "models" / f"{RANDOM_MODEL}-{seed}"
        if not (folder / "unet").is_dir():
            _say(f"saving the tiny architecture with random weights (seed {seed}) to {folder}",
                 quiet)
            from imageragturbo.export.onnx_export import random_tiny_components
            from imageragturbo.model.family import save_sd_folder

            save_sd_folder(random_tiny_components(seed), folder)
        return str(folder)
    path = VARIANTS.get(model, Path(model))
    if not Path(path).is_dir():
        if model in VARIANTS:
            raise FileNotFoundError(
                f"the default model {model!r} is not installed at {path}: train it first with "
                "`imageragturbo train base` (see README), or try the serving stack on random "
                "weights with --random-weights")
        raise FileNotFoundError(f"model {model!r} not found: give a variant name "
                                f"({', '.join(VARIANTS)}) or a local diffusers folder")
    return model


def _folder(model) -> Path:
    """A variant name or a folder, as the folder it names (for comparing the two spellings)."""
    return Path(VARIANTS.get(str(model), Path(str(model)))).resolve()


def _stale(recorded: str | None, current: str | None, what: str, path: Path,
           explicit: bool, quiet: bool) -> bool:
    """True when ``path`` was made from other weights and should be rebuilt; a folder the
    user named is never rebuilt behind their back."""
    if current is None or recorded == current:
        return False
    if explicit and recorded is None:
        return False  # exported from in-memory components: nothing to compare
    if explicit:
        raise ValueError(f"{what} {path} was made from other weights ({recorded}) than "
                         f"{current}; remove it or give another folder")
    _say(f"the model's weights changed since {what} {path} was made; rebuilding it", quiet)
    return True


def ensure_export(model: str, export_dir: Path | None = None, fp16: bool = False,
                  quiet: bool = False) -> Path:
    """The model's ONNX export, made when missing or when the weights changed since."""
    from imageragturbo.defaults import model_files_id
    from imageragturbo.runtime.manifest import MANIFEST

    out = Path(export_dir) if export_dir else export_dir_of(model)
    ident = model_files_id(model)
    manifest = out / MANIFEST
    if manifest.exists() and not _stale(json.loads(manifest.read_text()).get("model_files_id"),
                                        ident, "export", out, export_dir is not None, quiet):
        return out
    _say(f"exporting {model} to ONNX in {out}", quiet)
    from imageragturbo.export.onnx_export import export_from_model

    export_from_model(model, out, fp16=fp16, progress=not quiet, overwrite=True)
    return out


def ensure_index(model: str, index_dir: Path | None = None, data: Path = DATA_ROOT,
                 retrieval_items: int | None = None, quiet: bool = False) -> Path:
    """The model's retrieval index over the ShapesWorld retrieval split (built, with the split
    when ``data`` lacks it, the first time, and again when the weights changed since)."""
    from imageragturbo.defaults import model_files_id

    out = Path(index_dir) if index_dir else index_dir_of(model)
    manifest = out / "manifest.json"
    if manifest.exists() and not _stale(json.loads(manifest.read_text()).get("model_id"),
                                        model_files_id(model, index=True), "index", out,
                                        index_dir is not None, quiet):
        return out
    from imageragturbo import shapesworld as sw
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever import build_index, shapesworld_pairs

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
    build_index(pairs, load_retrieval_encoder(model), out, progress=not quiet,
                model_source=str(model), overwrite=True)
    return out


def prepare(model: str = DEFAULT_MODEL, export_dir: Path | None = None,
            index_dir: Path | None = None, data: Path = DATA_ROOT,
            random_weights: bool = False, retrieval_items: int | None = None,
            fp16: bool = False, quiet: bool = False) -> Assets:
    """Export and index for ``model``, made when missing. An existing index built for
    another model is refused (its keys are in another text space)."""
    model = model_folder(model, random_weights, quiet=quiet)
    exp = ensure_export(model, export_dir, fp16=fp16, quiet=quiet)
    idx = ensure_index(model, index_dir, data, retrieval_items, quiet=quiet)
    from imageragturbo.defaults import model_files_id

    manifest = json.loads((idx / "manifest.json").read_text())
    src = manifest.get("model_source")
    # another path may hold the same weights (identity), e.g. the installed package's copy;
    # hashed only then, since it reads every weight file
    if (src is not None and _folder(src) != _folder(model)
            and manifest.get("model_id") != model_files_id(model, index=True)):
        raise ValueError(f"index {idx} was built for model {src!r}, not {model!r}; give the "
                         "matching --index or remove it to rebuild")
    return Assets(model, exp, idx)
