"""What a server needs on disk: the ONNX export and the retrieval index of one model, made
once when missing (export via ``export_from_model``; index from the ShapesWorld retrieval
split: ``retriever.ensure.ensure_index`` with the model's own encoder), handed to ``serving`` as
``serving.session.Assets``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, VARIANTS, export_dir_of, rebuild_needed
from imageragturbo.serving.session import DEFAULT_RUNS, Assets

RANDOM_MODEL = "tiny-random"


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


def ensure_export(model: str, export_dir: Path | None = None, fp16: bool = False,
                  quiet: bool = False) -> Path:
    """The model's ONNX export, made when missing or when the weights changed since."""
    from imageragturbo.defaults import model_files_id
    from imageragturbo.runtime.manifest import MANIFEST

    out = Path(export_dir) if export_dir else export_dir_of(model)
    ident = model_files_id(model)
    manifest = out / MANIFEST
    if manifest.exists() and not rebuild_needed(
            json.loads(manifest.read_text()).get("model_files_id"), ident, "export", out,
            export_dir is not None, say=lambda m: _say(m, quiet)):
        return out
    _say(f"exporting {model} to ONNX in {out}", quiet)
    from imageragturbo.export.onnx_export import export_from_model

    export_from_model(model, out, fp16=fp16, progress=not quiet, overwrite=True)
    return out


def prepare(model: str = DEFAULT_MODEL, export_dir: Path | None = None,
            index_dir: Path | None = None, data: Path = DATA_ROOT,
            random_weights: bool = False, retrieval_items: int | None = None,
            fp16: bool = False, quiet: bool = False) -> Assets:
    """Export and index for ``model``, made when missing. An existing index built for
    another model is refused (its keys are in another text space)."""
    from imageragturbo.defaults import model_files_id
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever.ensure import ensure_index

    model = model_folder(model, random_weights, quiet=quiet)
    exp = ensure_export(model, export_dir, fp16=fp16, quiet=quiet)
    idx = ensure_index(model, index_dir, data, retrieval_items, quiet=quiet,
                       load_encoder=load_retrieval_encoder)

    manifest = json.loads((idx / "manifest.json").read_text())
    src = manifest.get("model_source")
    # another path may hold the same weights (identity), e.g. the installed package's copy;
    # hashed only then, since it reads every weight file
    if (src is not None and _folder(src) != _folder(model)
            and manifest.get("model_id") != model_files_id(model, index=True)):
        raise ValueError(f"index {idx} was built for model {src!r}, not {model!r}; give the "
                         "matching --index or remove it to rebuild")
    return Assets(model, exp, idx)
