"""``imageragturbo bench quality``: the paper's Table 2 and Fig. 3 rebuilt on ShapesWorld, every
row on the same evaluation prompts and seeds, in one run.

Rows: the teacher at N steps and at 1 step; the one-step student as distilled; the student
with training-free slerp injection of the top-1 neighbour (Eq. 3) at the paper's fixed
w = 0.8 and with the per-prompt oracle w* over {0.1, ..., 0.9} (the best ShapesTIFA of the nine,
the paper's upper bound that needs the answer to pick); ImageRAGTurbo (the trained H-adapter
and decoder LoRA, ``imageragturbo train adapter``) at k = 1 and k = 4; and, when given, the
no-retrieval control (the same fine-tuning without retrieval) and any ablation runs.

Columns: ShapesTIFA overall, per category, on the tail prompts (holding a combination absent
or rare in training) and on the rest; FD; the CLIP-score analogue; NFE; and the one-step
latency through ONNX Runtime on the CPU (median of batch-1 requests, same run) with and
without retrieval.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.defaults import DEFAULT_MODEL

from . import evaluate, tifa
from . import shapesworld as sw
from .grids import row_grid

SLERP_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))   # the paper's {0.1, ..., 0.9}


def with_finetune(model: str, run_export: str | Path):
    """The base student with another run's ``h_adapter/`` and ``unet_lora/`` (a control or
    ablation run's export folder) in place of the installed ones."""
    from .model.family import LORA_DIR, load_components
    from .model.h_space import HAdapter
    from .model.lora import merge_decoder_lora

    run_export = Path(run_export)
    if not (run_export / "h_adapter").is_dir():
        raise FileNotFoundError(f"{run_export} has no h_adapter/: give a run's export folder "
                                "(imageragturbo train adapter ... --run-dir RUN: RUN/export)")
    c = load_components(model, retrieval_tuned=False)
    c.h_adapter = HAdapter.from_pretrained(run_export / "h_adapter")
    if (run_export / LORA_DIR).is_dir():
        merge_decoder_lora(c.unet, run_export / LORA_DIR)
    return c.eval()


def student_images(c, prompts, seeds, h_retr=None, lam=None, slerp_w=None, batch=100,
                   desc="student", progress=True) -> np.ndarray:
    """One-step images for the prompts (as ``pipeline.student_generate``), ``batch`` at a
    time; h_retr (N, k, C, h, w), lam (N,) or slerp_w (scalar) as that function takes them."""
    import torch
    from tqdm import tqdm

    from .model.pipeline import student_generate

    out = []
    for a in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
        sl = slice(a, a + batch)
        hr = None if h_retr is None else torch.from_numpy(h_retr[sl])
        lm = None if lam is None else torch.from_numpy(lam[sl])
        out.append(student_generate(c, list(prompts[sl]), list(seeds[sl]), h_retr=hr, lam=lm,
                                    slerp_w=slerp_w))
    return np.concatenate(out)


def split_scores(per_prompt: Sequence[dict], items: Sequence[sw.Item]) -> dict:
    """Mean ShapesTIFA over the tail prompts (an absent or rare combination) and the rest."""
    acc = np.array([p["accuracy"] for p in per_prompt])
    tail = np.array([bool(it.scene.tail_combos()) for it in items])
    return {"tail": float(acc[tail].mean()) if tail.any() else float("nan"),
            "rest": float(acc[~tail].mean()) if (~tail).any() else float("nan"),
            "n_tail": int(tail.sum()), "n_rest": int((~tail).sum())}


def neighbours(model: str, c, prompts: Sequence[str], k: int, index=None, progress=True):
    """The index (``index`` or the model's default, built when missing), and each prompt's k
    neighbours: their cached H features (N, k, C, h, w) float32 and scores (N, k)."""
    import torch

    from .model.pipeline import encode_prompt
    from .retriever import RetrievalIndex
    from .serving.assets import ensure_index

    idx = RetrievalIndex.load(ensure_index(model, Path(index) if index else None,
                                           quiet=not progress))
    with torch.no_grad():
        pooled = np.concatenate([encode_prompt(c, list(prompts[a:a + 256]))[1].numpy()
                                 for a in range(0, len(prompts), 256)])
    ids, scores = idx.search(pooled, k)
    return idx, ids, idx.h(ids).astype(np.float32), scores.astype(np.float32)


def onnx_latency(c, index, k_values=(0, 1, 4), repeats: int = 30, threads: int = 1) -> dict:
    """Median ms of one batch-1 request through the in-process ONNX Runtime pipeline (the
    served graphs), text encoding and retrieval included, for each k (0: no retrieval): the
    timing of ``bench serve``'s in-process side, on a fresh export of ``c``, one pipeline and
    the loaded ``index`` for every k."""
    from imageragturbo import runtime
    from imageragturbo.export import onnx_export
    from imageragturbo.serving.bench import _pct, batch1_ms, in_process_request

    with tempfile.TemporaryDirectory() as tmp:
        export = onnx_export.export_model(c, Path(tmp) / "export", source="bench-quality",
                                          progress=False)
        pipe = runtime.OnnxPipeline(export, providers=runtime.choose_providers(["cpu"]),
                                    threads=threads)
        return {f"k{k}": round(_pct(batch1_ms(in_process_request(pipe, index, k), repeats, 3),
                                    50), 3)
                for k in k_values}


def run(model: str = DEFAULT_MODEL, n: int = 500, seed: int = 0, teacher_steps: int = 50,
        guidance: float = 4.0, index: str | Path | None = None,
        runs: dict[str, str | Path] | None = None, grid: str | Path | None = None,
        latency: bool = True, progress: bool = True) -> dict:
    """Every row on the eval split's first ``n`` prompts with seeds seed*1e6 + i. ``runs``:
    extra rows {name: a run's export folder} (the control and ablations), each at k = 4 (or
    without retrieval when named like the control)."""
    import torch

    from .model.clip_scorer import ClipScorer
    from .model.family import load_components, resolve
    from .model.pipeline import decode_latents

    items = sw.make_split("eval", n, seed)
    prompts = [it.caption for it in items]
    seeds = [seed * 1_000_000 + i for i in range(len(items))]
    base = load_components(model, with_teacher=True, retrieval_tuned=False)
    tuned = load_components(model)
    if tuned.h_adapter is None:
        raise FileNotFoundError(f"{model} has no trained h_adapter: run `imageragturbo train "
                                "adapter --install` first")
    scorer = ClipScorer.from_pretrained(resolve(model) / "clip_scorer")
    ref_items = sw.make_split("retrieval", max(2 * n, 200), seed)
    reference = np.stack([np.asarray(sw.render(it.scene)) for it in ref_items])

    idx, ids, h4, scores = neighbours(model, base, prompts, 4, index, progress)
    lam = scores[:, 0].copy()

    images: dict[str, np.ndarray] = {}
    nfe: dict[str, int] = {}
    images[f"teacher x{teacher_steps}"] = evaluate.generate(
        base, prompts, seeds, "teacher", teacher_steps, guidance, progress=progress)
    nfe[f"teacher x{teacher_steps}"] = 2 * teacher_steps  # classifier-free guidance
    images["teacher x1"] = evaluate.generate(base, prompts, seeds, "teacher", 1, guidance,
                                             progress=progress)
    nfe["teacher x1"] = 2
    images["student x1"] = student_images(base, prompts, seeds, progress=progress)
    images["student + slerp w=0.8"] = student_images(base, prompts, seeds, h4[:, :1],
                                                     slerp_w=0.8, desc="slerp 0.8",
                                                     progress=progress)
    # the oracle: per prompt, the best of the nine slerp strengths by ShapesTIFA itself
    records = [(it.id, it.caption, it.scene) for it in items]
    best_acc = np.full(n, -1.0)
    best_w = np.zeros(n)
    oracle = np.zeros_like(images["student x1"])
    for w in SLERP_GRID:
        im = student_images(base, prompts, seeds, h4[:, :1], slerp_w=w, desc=f"slerp {w}",
                            progress=progress)
        acc = np.array([p["accuracy"] for p in tifa.score(records, list(im))["per_prompt"]])
        better = acc > best_acc
        best_acc[better], best_w[better], oracle[better] = acc[better], w, im[better]
    images["student + slerp oracle w*"] = oracle
    for k in (1, 4):
        images[f"ImageRAGTurbo k={k}"] = student_images(tuned, prompts, seeds, h4[:, :k], lam,
                                                        desc=f"ImageRAGTurbo k={k}",
                                                        progress=progress)
    for name, folder in (runs or {}).items():
        c = with_finetune(model, folder)
        if "control" in name:
            # its adapter was trained on the target's own feature, lambda 1: served that way
            images[name] = _control_images(c, prompts, seeds, progress)
        else:
            images[name] = student_images(c, prompts, seeds, h4, lam, desc=name,
                                          progress=progress)
    for name in images:
        nfe.setdefault(name, 1)

    results = {}
    for name, im in images.items():
        r = evaluate.measure(base, scorer, items, im, reference)
        r.update(split_scores(r.pop("per_prompt"), items), nfe=nfe[name])
        results[name] = r
    results["student + slerp oracle w*"]["w_star_histogram"] = {
        str(w): int((best_w == w).sum()) for w in SLERP_GRID}
    if latency:
        lat_base = onnx_latency(base, idx, k_values=(0,))
        lat_tuned = onnx_latency(tuned, idx, k_values=(0, 1, 4))
        results["student x1"]["latency_ms"] = lat_base["k0"]
        for k in (1, 4):
            results[f"ImageRAGTurbo k={k}"]["latency_ms"] = lat_tuned[f"k{k}"]
        results["_latency"] = {"student_k0": lat_base["k0"], **{
            f"imageragturbo_{key}": v for key, v in lat_tuned.items()},
            "note": "ONNX Runtime CPU, 1 thread, batch 1, median ms"}
    if grid:
        with torch.no_grad():
            nb = idx.latents(ids[:8]).astype(np.float32)               # (8, 4, C, h, w)
            nb_images = decode_latents(base, torch.from_numpy(nb.reshape(-1, *nb.shape[2:])))
        rows = {"student x1": images["student x1"][:8],
                "slerp w=0.8": images["student + slerp w=0.8"][:8],
                "ImageRAGTurbo k=4": images["ImageRAGTurbo k=4"][:8]}
        rows.update({f"neighbour {j + 1}": nb_images.reshape(8, 4, *nb_images.shape[1:])[:, j]
                     for j in range(4)})
        rows["render"] = np.stack([np.asarray(sw.render(it.scene)) for it in items[:8]])
        row_grid(rows, prompts[:8], grid)
    return results


def _control_images(c, prompts, seeds, progress=True) -> np.ndarray:
    """The control as it was trained: the adapter attends to the target's own H feature
    (nothing retrieved), lambda 1."""
    import torch

    class OwnFeature(torch.nn.Module):
        def __init__(self, adapter):
            super().__init__()
            self.adapter = adapter

        def forward(self, h, h_retr, lam):
            return self.adapter(h, h.unsqueeze(1), torch.ones_like(lam))

    c.h_adapter = OwnFeature(c.h_adapter)
    shape = (len(prompts), 1, c.h_adapter.adapter.config.channels, 1, 1)
    return student_images(c, prompts, seeds, np.zeros(shape, np.float32),
                          np.ones(len(prompts), np.float32), desc="control",
                          progress=progress)
