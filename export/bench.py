"""``imageragturbo bench pipeline``: median latency of each stage and of the whole one-step
request, PyTorch eager against ONNX Runtime, measured in one run on the same inputs.

Both backends run the same five stages (docs/design.md, "The request path"): the H-adapter
is included with ``k`` retrieved features per prompt (random stand-ins for the index's
cached h_retr: the retriever's own latency is ``bench retrieval``); a model without a
trained adapter gets a zero-initialised one, which costs the same compute.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from imageragturbo.defaults import DEFAULT_MODEL
from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter, adapter_config_for
from imageragturbo.runtime.pipeline import OnnxPipeline, choose_providers

from .onnx_export import export_model, random_tiny_components, stage_specs


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def load_bench_components(model: str, random_weights: bool) -> tuple[family.Components, str]:
    """The model to measure: ``model`` loaded, or its architecture with random weights (the
    default tiny config when ``model`` is the not-yet-trained ``tiny-shapes``)."""
    if random_weights:
        if model not in family.VARIANTS:
            raise ValueError("--random-weights builds the default tiny architecture; give no "
                             "--model (or --model tiny-shapes) with it")
        return random_tiny_components(), "random (family.tiny_*_config)"
    return family.load_components(model), "loaded"


def bench_pipeline(model: str = DEFAULT_MODEL, random_weights: bool = False,
                   batches: Sequence[int] = (1, 8), repeats: int = 20, warmup: int = 3,
                   threads: int | None = None, k: int = 1, providers: Sequence[str] | None = None,
                   progress: bool = True) -> dict:
    """Per-stage and end-to-end median milliseconds for each batch size, both backends."""
    from tqdm import tqdm

    from imageragturbo.model.pipeline import student_generate

    if repeats < 1 or warmup < 0 or k < 1 or any(b < 1 for b in batches):
        raise ValueError("repeats, k and batch sizes must be >= 1 and warmup >= 0")
    if threads:
        torch.set_num_threads(int(threads))
    c, weights = load_bench_components(model, random_weights)
    if c.h_adapter is None:
        c.h_adapter = HAdapter(adapter_config_for(c.unet))
        adapter_kind = "fresh (zero-initialised)"
    else:
        adapter_kind = "trained"
    c.eval()
    import onnxruntime as ort

    res: dict = {
        "model": model, "weights": weights, "adapter": adapter_kind, "k": k,
        "repeats": repeats, "warmup": warmup, "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(), "batches": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        export_model(c, tmp, source=model, overwrite=True, progress=False)
        ort_pipe = OnnxPipeline(tmp, providers=choose_providers(providers), threads=threads)
        res["providers"] = ort_pipe.active_providers
        bar = tqdm(total=len(batches) * 2, desc="bench pipeline", disable=not progress)
        for b in batches:
            specs = stage_specs(c, c.h_adapter, batch=b, k=k)
            row = {"torch": {}, "onnx": {}}
            for s in specs:
                feeds = {n: a.numpy() for n, a in zip(s.inputs, s.args)}
                sess = ort_pipe.sessions[s.name]
                with torch.inference_mode():
                    row["torch"][s.name] = _median_ms(lambda s=s: s.module(*s.args),
                                                      repeats, warmup)
                row["onnx"][s.name] = _median_ms(lambda sess=sess, f=feeds: sess.run(None, f),
                                                 repeats, warmup)
            bar.update()
            prompts = [f"a red circle above {i} blue squares" for i in range(b)]
            seeds = list(range(b))
            rng = np.random.default_rng(0)
            h_retr = rng.standard_normal((b, k, *ort_pipe.h_shape), dtype=np.float32)
            lam = np.full((b,), 0.8, dtype=np.float32)
            h_retr_t, lam_t = torch.from_numpy(h_retr), torch.from_numpy(lam)
            run_torch = partial(student_generate, c, prompts, seeds, h_retr=h_retr_t, lam=lam_t)
            run_onnx = partial(ort_pipe.generate, prompts, seeds, h_retr=h_retr, lam=lam)
            row["torch"]["end_to_end"] = _median_ms(run_torch, repeats, warmup)
            row["onnx"]["end_to_end"] = _median_ms(run_onnx, repeats, warmup)
            a, o = run_torch(), run_onnx()
            row["image_max_abs_diff"] = int(np.abs(a.astype(int) - o.astype(int)).max())
            row["speedup"] = {s: round(row["torch"][s] / max(row["onnx"][s], 1e-9), 2)
                              for s in row["torch"]}
            res["batches"][str(b)] = row
            bar.update()
        bar.close()
    return res


def format_table(res: dict) -> str:
    lines = [f"model {res['model']} ({res['weights']}, adapter {res['adapter']}, k={res['k']}); "
             f"threads {res['threads']}; providers {res['providers']}; median of "
             f"{res['repeats']} runs, ms"]
    for b, row in res["batches"].items():
        lines.append(f"batch {b}:  {'stage':14s} {'torch':>9s} {'onnx':>9s} {'speedup':>8s}")
        for s in row["torch"]:
            lines.append(f"          {s:14s} {row['torch'][s]:9.2f} {row['onnx'][s]:9.2f} "
                         f"{row['speedup'][s]:8.2f}")
        lines.append(f"          image max |torch - onnx| = {row['image_max_abs_diff']}/255")
    return "\n".join(lines)
