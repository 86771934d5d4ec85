"""``imageragturbo bench quality``: the paper's Table 2 and Fig. 3 rebuilt on ShapesWorld, every
row on the same evaluation prompts and the same S noise seeds per prompt, in one run, with
intervals that tell a gain from noise.

Rows: the teacher at N steps and at 1 step; the one-step student as distilled; the student
with training-free slerp injection of the top-1 neighbour (Eq. 3) at the paper's fixed
w = 0.8 and with the per-prompt oracle w* over {0.1, ..., 0.9} (the best ShapesTIFA of the
nine, per seed: the paper's upper bound that needs the answer to pick), that oracle
cross-fitted (w* picked on one seed, scored on another) and the same two with a null h (a
random index item outside the prompt's top 32: what selection on noise alone gains);
ImageRAGTurbo (the trained H-adapter and decoder LoRA, ``imageragturbo train adapter``) at
k = 1 and k = 4 and the same weights with retrieval off (K = 0: no adapter, the merged LoRA
stays); when given, the no-retrieval control, ablation runs (each with its own K = 0 row) and
rows from ``extra_rows``.

Columns: ShapesTIFA (a prompt's score is the mean over its seeds) overall, per category and on
the prompts whose rarest colour-shape combination is absent / rare / common in training;
paired bootstrap 95 % intervals (prompts resampled) against the student and against the row's
retrieval-off partner; FD; the CLIP-score analogue; diversity (mean pairwise 1 - cosine of the
CLIP analogue's image features between a prompt's seeds; pixel RMS in the JSON); NFE; and the
one-step latency through ONNX Runtime on the CPU (median of batch-1 requests, same run) with
and without retrieval.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from imageragturbo.defaults import DEFAULT_MODEL

from . import evaluate, stats, tifa
from . import shapesworld as sw
from .grids import row_grid

SLERP_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))   # the paper's {0.1, ..., 0.9}
CLASSES = ("absent", "rare", "common")                          # rarest first
STUDENT = "student x1"
ORACLE = "student + slerp oracle w*"
NULL_ORACLE = "student + slerp null oracle w* (random h)"
CROSS_FITTED = ", cross-fitted"
TUNED_OFF = "ImageRAGTurbo, retrieval off (K = 0)"
NULL_EXCLUDE = 32        # the null oracle's h comes from outside the prompt's top 32

# an extra row: (prompts, seeds) -> uint8 images (len(prompts), H, W, 3)
RowFn = Callable[[list, list], np.ndarray]


def prompt_class(scene: sw.Scene) -> str:
    """'absent', 'rare' or 'common': the rarest (in training) colour-shape combination of the
    scene (absent < rare < common)."""
    found = {sw.combo_class(g.colour, g.shape) for g in scene.groups}
    return next((c for c in CLASSES if c in found), "common")


def with_finetune(model: str, run_export: str | Path):
    """The base student with another run's ``h_adapter/`` and ``unet_lora/`` (a control or
    ablation run's export folder) in place of the installed ones."""
    from .model.family import LORA_DIR, attach_neighbour_attention, load_components
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
    attach_neighbour_attention(c, run_export)
    from .model.pipeline import neighbour_start_of

    c.neighbour_start = neighbour_start_of(c, run_export / "adapter_training.json")
    return c.eval()


def _tile(x: np.ndarray, s: int) -> np.ndarray:
    """Per-prompt arrays (N, ...) repeated for S seeds, seed-major (S * N, ...)."""
    return np.concatenate([x] * s)


def non_neighbours(idx, pooled: np.ndarray, retrieved: np.ndarray, count: int,
                   seed: int = 0, exclude: int = NULL_EXCLUDE) -> np.ndarray:
    """(N, count) distinct index items per prompt drawn at random (fixed RNG) from outside its
    exact top ``exclude`` and its ``retrieved`` ids."""
    top, _ = idx.exact_search(pooled, exclude)
    rng = np.random.default_rng([seed, exclude])
    out = []
    for near in np.concatenate([top, retrieved], axis=1):
        pool = np.setdiff1d(np.arange(len(idx)), near)
        if len(pool) < count:
            raise ValueError(f"the null oracle needs {count} index items outside each "
                             f"prompt's top {exclude}; the index has {len(idx)}")
        out.append(rng.choice(pool, count, replace=False))
    return np.stack(out)


def oracle_search(generate: Callable[[int, float], np.ndarray], records: Sequence, s: int,
                  n: int) -> dict:
    """The per-prompt, per-seed best of the nine slerp strengths by ShapesTIFA.
    ``generate(m, w)``: the S * N images (seed-major) at SLERP_GRID[m] = w. Returns the best
    images and w (the oracle), and the cross-fitted images and w (seed j's strength is the one
    picked on seed j + 1 mod S: with S = 2, picked on one seed and scored on the other both
    ways; None with one seed)."""
    accs, ims = [], None
    for m, w in enumerate(SLERP_GRID):
        im = generate(m, w)
        accs.append([p["accuracy"] for p in tifa.score(records, list(im))["per_prompt"]])
        if ims is None:
            ims = np.empty((len(SLERP_GRID), *im.shape), im.dtype)
        ims[m] = im
    acc = np.asarray(accs).reshape(len(SLERP_GRID), s, n)
    best = acc.argmax(0)            # the first best: the lowest w among ties
    grid, flat = np.asarray(SLERP_GRID), np.arange(s * n)
    out = {"best": ims[best.reshape(-1), flat], "w_best": grid[best],
           "cross": None, "w_cross": None}
    if s > 1:
        cross = np.roll(best, -1, axis=0)
        out.update(cross=ims[cross.reshape(-1), flat], w_cross=grid[cross])
    return out


def image_features(scorer, images: np.ndarray) -> np.ndarray:
    """The CLIP-score analogue's image features (those FD uses), (N, D)."""
    import torch

    with torch.no_grad():
        return np.concatenate([scorer.image.features(scorer.to_input(images[i:i + 256]))
                               .numpy() for i in range(0, len(images), 256)])


def onnx_latency(c, index, k_values=(0, 1, 4), repeats: int = 30, threads: int = 1) -> dict:
    """Median ms of one batch-1 request through the in-process ONNX Runtime pipeline (the
    served graphs), text encoding and retrieval included, for each k (0: no retrieval): the
    timing of ``bench serve``'s in-process side, on a fresh export of ``c``, one pipeline and
    the loaded ``index`` for every k."""
    from imageragturbo import runtime
    from imageragturbo.export import onnx_export
    from imageragturbo.runtime.latency import batch1_ms, in_process_request

    with tempfile.TemporaryDirectory() as tmp:
        export = onnx_export.export_model(c, Path(tmp) / "export", source="bench-quality",
                                          progress=False)
        pipe = runtime.OnnxPipeline(export, providers=runtime.choose_providers(["cpu"]),
                                    threads=threads)
        return {f"k{k}": round(stats.percentile(
                    batch1_ms(in_process_request(pipe, index, k), repeats, 3), 50), 3)
                for k in k_values}


def latency_of(base, tuned, idx, repeats: int = 30) -> dict:
    """The latency columns of the table, in one run on one index: the student's batch-1
    request (no retrieval) and the installed model's at K = 0, 1 and 4 (``onnx_latency``),
    each ratio to the installed model's K = 0, and the FLOPs (``stage_flops``)."""
    base_ms = onnx_latency(base, idx, k_values=(0,), repeats=repeats)
    tuned_ms = onnx_latency(tuned, idx, k_values=(0, 1, 4), repeats=repeats)
    out = {"student_k0": base_ms["k0"],
           **{f"imageragturbo_{key}": v for key, v in tuned_ms.items()}}
    out.update({f"ratio_k{k}_vs_k0": round(tuned_ms[f"k{k}"] / tuned_ms["k0"], 3)
                for k in (1, 4)})
    out["note"] = "ONNX Runtime CPU, 1 thread, batch 1, median ms"
    out["flops"] = stage_flops(tuned)
    return out


def latency_only(model: str = DEFAULT_MODEL, index: str | Path | None = None,
                 repeats: int = 30) -> dict:
    """``bench quality --latency-only``: the latency columns and FLOPs alone (no images
    scored), for a measurement taken with nothing else on the CPU."""
    from .model.family import load_components

    base = load_components(model, with_teacher=False, retrieval_tuned=False)
    tuned = load_components(model)
    evaluate.require_adapter(tuned, model)
    idx = evaluate.neighbours(model, base, ["a red circle"], 1, index, progress=False)[0]
    return latency_of(base, tuned, idx, repeats)


def stage_flops(c, k_values=(1, 4)) -> dict:
    """FLOPs of one batch-1 request through the five stages as exported (the torch modules the
    ONNX graphs are traced from; torch's FlopCounterMode counts matmuls and convolutions), and
    what the H-adapter adds at each k: the compute side of the paper's latency argument."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .model.pipeline import latent_shape, tokenize
    from .model.stages import OneStepStudent, TextEncoder, VAEDecoder

    def count(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    ids = tokenize(c.tokenizer, ["a red circle"])
    ehs, _ = TextEncoder(c.text_encoder)(ids)
    z = torch.zeros(1, *latent_shape(c))
    student = OneStepStudent(c.unet, c.alphas_cumprod, c.scheduler.config.prediction_type)
    h = student.unet_encoder(z, torch.full((1,), 999), ehs)[0]
    out = {"text_encoder": count(lambda: TextEncoder(c.text_encoder)(ids)),
           "unet": count(lambda: student(z, ehs)),
           "vae_decoder": count(lambda: VAEDecoder(c.vae)(z))}
    out["one_step"] = sum(out.values())
    if c.h_adapter is not None:
        for k in k_values:
            h_retr = h.unsqueeze(1).expand(1, k, *h.shape[1:])
            out[f"h_adapter_k{k}"] = count(lambda hr=h_retr: c.h_adapter(h, hr, torch.ones(1)))
            out[f"h_adapter_k{k}_share"] = round(out[f"h_adapter_k{k}"] / out["one_step"], 4)
    return out


def run(model: str = DEFAULT_MODEL, n: int = 500, seed: int = 0, teacher_steps: int = 50,
        guidance: float = 4.0, index: str | Path | None = None,
        runs: dict[str, str | Path] | None = None, grid: str | Path | None = None,
        latency: bool = True, progress: bool = True, seeds: int = 3,
        extra_rows: dict[str, RowFn] | None = None, retrieval_off: dict[str, str] | None = None,
        extra_nfe: dict[str, int] | None = None,
        retrieval_guidance: Sequence[float] = (), neighbour_pools: Sequence[int] = (),
        runs_only: bool = False) -> dict:
    """Every row on the eval split's first ``n`` prompts, each under ``seeds`` noise seeds
    (``evaluate.noise_seeds``), generated by ``evaluate.generate``. ``runs``: extra rows
    {name: a run's export folder} (the control and ablations), each at k = 4 with a
    "<name>, K = 0" partner (the control, named so, without retrieval). ``extra_rows``:
    {name: fn(prompts, seeds) -> uint8 images}, called once with the S * N prompts and seeds
    (seed-major: all prompts at seed 0, then seed 1, ...);
    ``retrieval_off``: {row: its retrieval-off row} for them (any row name, built-in ones
    such as ``TUNED_OFF`` included); ``extra_nfe``: their NFE (default 1). ``runs_only``: the
    student and the ``runs`` (each with its K = 0 row) alone: no teacher, slerp, oracle or
    installed-model rows, no latency or grid (comparing training runs; minutes, not an hour)."""
    import torch

    from .model.family import load_components
    from .model.pipeline import decode_latents

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    items = sw.make_split("eval", n, seed)
    n, s = len(items), seeds
    prompts = [it.caption for it in items]
    classes = np.array([prompt_class(it.scene) for it in items])
    grid_seeds = evaluate.noise_seeds(seed, n, s)
    P, SD = prompts * s, grid_seeds.reshape(-1).tolist()       # every image, seed-major
    records = [(it.id, it.caption, it.scene) for it in items] * s
    base = load_components(model, with_teacher=True, retrieval_tuned=False)
    tuned = load_components(model)
    evaluate.require_adapter(tuned, model)
    scorer = evaluate.load_scorer(model)
    reference = evaluate.fd_reference(n, seed)

    idx, ids, h4, scores = evaluate.neighbours(model, base, prompts, 4, index, progress)
    H4, LAM = _tile(h4, s), _tile(scores[:, 0].copy(), s)

    TOP1 = _tile(ids[:, 0], s)                                   # each image's top-1 item

    def student(c, h=None, lam=None, w=None, desc="student", guidance=None, top1=None):
        start = {}
        if c.neighbour_start is not None and h is not None and w is None:
            # a neighbour-start model, retrieval on: its step starts from the top-1 neighbour
            top1 = TOP1 if top1 is None else top1
            start = {"z_init": idx.latents(top1).astype(np.float32),
                     "t_init": c.neighbour_start["timestep"]}
        return evaluate.generate(c, P, SD, h_retr=h, lam=lam, slerp_w=w,
                                 retrieval_guidance=guidance, desc=desc, progress=progress,
                                 **start)

    drawn: dict[int, tuple] = {}

    def pooled_row(c, pool, desc):
        """k = 1, the neighbour drawn by each image's seed from the prompt's top ``pool`` (as
        served with --neighbour-pool): per seed, another neighbour."""
        from .runtime.request import sample_neighbours

        if pool not in drawn:
            _, cand, _, cand_sc = evaluate.neighbours(model, base, prompts, pool, index,
                                                      progress=False)
            rows = [sample_neighbours(cand, cand_sc, 1, grid_seeds[j].tolist())
                    for j in range(s)]                                   # per seed: (N, 1) each
            ids_p = np.concatenate([r[0] for r in rows])                 # (S * N, 1), seed-major
            drawn[pool] = ids_p, np.concatenate([r[1][:, 0] for r in rows]).astype(np.float32)
        ids_p, lam_p = drawn[pool]
        return student(c, idx.h(ids_p).astype(np.float32), lam_p, desc=desc, top1=ids_p[:, 0])

    images: dict[str, np.ndarray] = {}
    nfe: dict[str, int] = {}
    partner: dict[str, str] = {}
    w_star = {}
    images[STUDENT] = student(base)
    if not runs_only:
        teacher = f"teacher x{teacher_steps}"
        images[teacher] = evaluate.generate(base, P, SD, "teacher", teacher_steps, guidance,
                                            progress=progress)
        nfe[teacher] = 2 * teacher_steps  # classifier-free guidance
        images["teacher x1"] = evaluate.generate(base, P, SD, "teacher", 1, guidance,
                                                 progress=progress)
        nfe["teacher x1"] = 2
        images = {teacher: images.pop(teacher), "teacher x1": images.pop("teacher x1"),
                  **images}                                        # the table's row order
        images["student + slerp w=0.8"] = student(base, H4[:, :1], w=0.8, desc="slerp 0.8")
        # the oracles: per prompt and seed, the best of the nine slerp strengths by ShapesTIFA
        # itself, with the top-1 neighbour and with a random non-neighbour (a new one per w)
        null_h = idx.h(non_neighbours(idx, evaluate.prompt_embeddings(base, prompts), ids,
                                      len(SLERP_GRID), seed)).astype(np.float32)
        searches = {
            ORACLE: lambda m, w: student(base, H4[:, :1], w=w, desc=f"slerp {w}"),
            NULL_ORACLE: lambda m, w: student(base, _tile(null_h[:, m:m + 1], s), w=w,
                                              desc=f"null slerp {w}")}
        for name, gen in searches.items():
            o = oracle_search(gen, records, s, n)
            images[name], w_star[name] = o["best"], o["w_best"]
            if o["cross"] is not None:
                images[name + CROSS_FITTED], w_star[name + CROSS_FITTED] = o["cross"], o["w_cross"]
        for k in (1, 4):
            name = f"ImageRAGTurbo k={k}"
            images[name], partner[name] = student(tuned, H4[:, :k], LAM, desc=name), TUNED_OFF
        images[TUNED_OFF] = student(tuned, desc=TUNED_OFF)        # the merged LoRA, no adapter
        for pool in neighbour_pools:
            name = f"ImageRAGTurbo k=1, neighbour drawn by seed from top {pool}"
            images[name], partner[name] = pooled_row(tuned, pool, name), TUNED_OFF
        for g in retrieval_guidance:
            name = f"ImageRAGTurbo k=4, retrieval guidance {g:g}"
            images[name] = student(tuned, H4, LAM, desc=name, guidance=g)
            partner[name], nfe[name] = TUNED_OFF, 2
    for name, folder in (runs or {}).items():
        folder, _, k = str(folder).partition("@")          # FOLDER@K: served at k (default 4)
        k = int(k or 4)
        if not 1 <= k <= H4.shape[1]:
            raise ValueError(f"--run {name}: k must be in [1, {H4.shape[1]}], got {k}")
        c = with_finetune(model, folder)
        if "control" in name:
            # its adapter was trained on the target's own feature, lambda 1: served that way
            images[name] = _control_images(c, P, SD, progress)
        else:
            images[name] = student(c, H4[:, :k], LAM, desc=name)
            partner[name] = f"{name}, K = 0"
            images[partner[name]] = student(c, desc=partner[name])
            for pool in neighbour_pools:
                row = f"{name}, k=1 drawn from top {pool}"
                images[row], partner[row] = pooled_row(c, pool, row), partner[name]
    for name, fn in (extra_rows or {}).items():
        im = np.asarray(fn(list(P), list(SD)))
        if im.shape != images[STUDENT].shape or im.dtype != np.uint8:
            raise ValueError(f"extra row {name!r} gave {im.dtype} {im.shape}, not uint8 "
                             f"{images[STUDENT].shape} (one image per prompt and seed)")
        images[name] = im
    nfe.update(extra_nfe or {})
    partner.update(retrieval_off or {})
    for name, off in partner.items():
        if name not in images or off not in images:
            raise ValueError(f"retrieval_off pairs {name!r} with {off!r}: no such row")

    results, acc = {}, {}
    for name, im in images.items():
        r = evaluate.measure(base, scorer, items * s, im, reference)
        a = np.array([p["accuracy"] for p in r.pop("per_prompt")]).reshape(s, n)
        acc[name] = a.mean(0)
        feats = image_features(scorer, im).reshape(s, n, -1)
        r.update({c: _mean(acc[name][classes == c]) for c in CLASSES})
        r.update(n_prompts=n, n_images=s * n, nfe=nfe.get(name, 1),
                 diversity=_mean(stats.seed_spread(feats)),
                 diversity_pixel_rms=_mean(stats.pixel_spread(im.reshape(s, n, *im.shape[1:]))))
        r["per_prompt"] = [{"id": it.id, "caption": it.caption, "combo_class": str(c),
                            "scores": a[:, i].tolist()}
                           for i, (it, c) in enumerate(zip(items, classes))]
        results[name] = r
    for name, r in results.items():
        ref = results[STUDENT]["diversity"]
        r["diversity_vs_student"] = r["diversity"] / ref if ref else float("nan")
        r["vs_student"] = {"row": STUDENT, **stats.split_intervals(
            acc[name], acc[STUDENT], classes, CLASSES)}
        if name in partner:
            r["vs_retrieval_off"] = {"row": partner[name], **stats.split_intervals(
                acc[name], acc[partner[name]], classes, CLASSES)}
    for name, w in w_star.items():
        results[name]["w_star_histogram"] = {str(v): int((w == v).sum()) for v in SLERP_GRID}
    results["_meta"] = {
        "model": str(model), "n": n, "seeds": s, "seed": seed,
        "noise_seed": f"seed * 1_000_000 + i + j * {evaluate.SEED_STRIDE} (prompt i, seed j)",
        "teacher_steps": teacher_steps, "guidance": guidance,
        "classes": {c: int((classes == c).sum()) for c in CLASSES},
        "class_rule": "a prompt's rarest colour-shape combination in training "
                      "(absent < rare < common)",
        "bootstrap": {"resamples": stats.RESAMPLES, "level": stats.LEVEL, "seed": 0,
                      "unit": "prompt (score: mean over its seeds)"},
        "retrieval_off": partner, "null_oracle_excludes_top": NULL_EXCLUDE,
        "cross_fit": "seed j uses the w* picked on seed j + 1 mod S",
        "diversity": "mean over prompts of the mean over seed pairs of 1 - cosine of the "
                     "CLIP analogue's image features (pixel RMS: values in [0, 1])"}
    if latency and not runs_only:
        results["_latency"] = lat = latency_of(base, tuned, idx)
        results[STUDENT]["latency_ms"] = lat["student_k0"]
        results[TUNED_OFF]["latency_ms"] = lat["imageragturbo_k0"]
        for k in (1, 4):
            results[f"ImageRAGTurbo k={k}"]["latency_ms"] = lat[f"imageragturbo_k{k}"]
    if grid and not runs_only:
        g = min(8, n)                                                  # seed 0's first prompts
        with torch.no_grad():
            nb = idx.latents(ids[:g]).astype(np.float32)               # (g, 4, C, h, w)
            nb_images = decode_latents(base, torch.from_numpy(nb.reshape(-1, *nb.shape[2:])))
        rows = {STUDENT: images[STUDENT][:g],
                "slerp w=0.8": images["student + slerp w=0.8"][:g],
                "ImageRAGTurbo k=4": images["ImageRAGTurbo k=4"][:g]}
        rows.update({f"neighbour {j + 1}": nb_images.reshape(g, 4, *nb_images.shape[1:])[:, j]
                     for j in range(4)})
        rows["render"] = np.stack([np.asarray(sw.render(it.scene)) for it in items[:g]])
        row_grid(rows, prompts[:g], grid)
    return results


def _mean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def _ci(iv: dict | None, split: str = "all") -> str:
    if not iv or split not in iv:
        return ""
    d = iv[split]
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table (one row per pipeline) with a line on how it was made."""
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    meta = results.get("_meta", {})
    cats = [c for c in tifa.CATEGORIES if any(c in r["categories"] for r in rows.values())]
    head = ["pipeline", "NFE", "ShapesTIFA", "vs student x1 (95% CI)",
            "vs retrieval off (95% CI)", *CLASSES, *cats, "FD", "CLIP", "diversity", "ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        ms = f"{r['latency_ms']:.1f}" if "latency_ms" in r else ""
        cells = [name, str(r["nfe"]), f"{r['tifa']:.3f}",
                 "" if name == STUDENT else _ci(r.get("vs_student")),
                 _ci(r.get("vs_retrieval_off")), *(f"{r[c]:.3f}" for c in CLASSES),
                 *(f"{r['categories'].get(c, float('nan')):.2f}" for c in cats),
                 f"{r['fd']:.1f}", f"{r['clip']:.3f}", f"{r['diversity']:.3f}", ms]
        lines.append("| " + " | ".join(cells) + " |")
    cls = meta.get("classes", {})
    pairs = "; ".join(f"{a} vs {b}" for a, b in meta.get("retrieval_off", {}).items())
    note = (f"{meta.get('n', '?')} evaluation prompts (absent {cls.get('absent', '?')} / rare "
            f"{cls.get('rare', '?')} / common {cls.get('common', '?')}: the prompt's rarest "
            f"colour-shape combination in training), {meta.get('seeds', '?')} noise seeds "
            "each; a prompt's score is the mean over its seeds. Intervals: the difference in "
            f"mean ShapesTIFA, paired bootstrap over prompts ({stats.RESAMPLES:,} resamples, "
            f"{stats.LEVEL:.0%}). Retrieval off: {pairs or 'none'}. Diversity: mean pairwise "
            "1 - cosine of the CLIP analogue's image features across a prompt's seeds."
            + (" ms: ONNX Runtime CPU, 1 thread, batch 1, median." if "_latency" in results
               else ""))
    return note + "\n\n" + "\n".join(lines) + "\n"


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
    return evaluate.generate(c, prompts, seeds, h_retr=np.zeros(shape, np.float32),
                             lam=np.ones(len(prompts), np.float32), desc="control",
                             progress=progress)
