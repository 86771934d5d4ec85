"""``imageragturbo generate``: one prompt in, one image out, on the request path's ONNX
Runtime pipeline (or PyTorch, or a running server through the SDK).

Standard library only at module level (the main CLI imports this for ``--help``); numpy,
onnxruntime and (for ``--backend torch`` only) torch load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imageragturbo.defaults import (
    DEFAULT_MODEL,
    ONNX_ROOT,
    RERANK_CANDIDATES,
    export_dir_of,
    index_dir_of,
)


def _write_images(images, output: Path) -> list[Path]:
    from PIL import Image

    output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}")
                 for i in range(len(images))]
    for img, p in zip(images, paths):
        Image.fromarray(img).save(p)
    return paths


def _generate_remote(args: argparse.Namespace, prompts: list[str], seeds: list[int]) -> int:
    """``generate --url``: through the gRPC SDK to a running ``imageragturbo serve``."""
    import numpy as np

    from imageragturbo.client import ImageRAGTurboClient, ImageRAGTurboError, UnavailableError

    try:
        with ImageRAGTurboClient(args.url, timeout=args.timeout) as client:
            results = client.generate_batch(prompts, seeds=seeds, k=args.k,
                                            strength=args.strength)
    except UnavailableError as e:
        print(f"imageragturbo: error: server {args.url} unavailable ({e}); is `imageragturbo "
              "serve` running there?", file=sys.stderr)
        return 1
    except ImageRAGTurboError as e:
        print(f"imageragturbo: error: server {args.url}: {e.status}: {e}", file=sys.stderr)
        return 1
    info = {"backend": "server", "url": args.url, "seeds": [r.seed for r in results]}
    if args.k > 0:
        info["neighbours"] = [[{"id": n.id, "score": round(n.score, 4), "caption": n.caption}
                               for n in r.neighbours] for r in results]
    info["images"] = [str(p) for p in _write_images(np.stack([r.array for r in results]),
                                                    args.output)]
    print(json.dumps(info, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from imageragturbo.runtime import pipeline as onnx_pipeline
    from imageragturbo.runtime import request

    if args.k < 0:
        raise ValueError(f"--k must be >= 0, got {args.k}")
    prompts = list(args.prompts)
    if any(not p.strip() for p in prompts):
        raise ValueError("prompts must not be empty")
    seeds = [args.seed + i for i in range(len(prompts))]
    if args.url:
        return _generate_remote(args, prompts, seeds)
    info: dict = {"backend": args.backend, "seeds": seeds}
    if args.backend == "onnx":
        folder = args.onnx or export_dir_of(args.model)
        if not (folder / "manifest.json").exists():
            if args.onnx:
                raise FileNotFoundError(f"no ONNX export at {folder}; run `imageragturbo "
                                        f"export --out {folder}`")
            from imageragturbo.export.onnx_export import export_from_model

            print(f"exporting {args.model} to {folder} (once)", file=sys.stderr)
            export_from_model(args.model, folder, progress=not args.quiet)
        pipe = onnx_pipeline.OnnxPipeline(folder, providers=args.providers, threads=args.threads)
        info["providers"] = pipe.active_providers
        text_dim = int(pipe.manifest["text_dim"])
        h_shape, has_adapter = pipe.h_shape, pipe.has_adapter

        def pooled_of(ps):
            return pipe.encode_prompt(ps)[1]

        start = pipe.neighbour_start

        run = pipe.generate
    else:  # the PyTorch model core (needs the train extra)
        from imageragturbo.model.pipeline import TorchStudent

        student = TorchStudent(args.model, threads=args.threads)
        text_dim, h_shape, has_adapter = student.text_dim, student.h_shape, student.has_adapter
        pooled_of = student.pooled

        start = student.neighbour_start

        run = student.generate
    if args.k > 0:
        index = request.load_index(args.index or index_dir_of(args.model), text_dim, h_shape)
        images, nb, lam, slerp_w = request.retrieve_and_generate(
            run, pooled_of, index, prompts, seeds, args.k, has_adapter=has_adapter,
            start=start, strength=args.strength, rerank=args.rerank,
            pool=request.served_pool(args.neighbour_pool, start if has_adapter else None))
        if start and lam is not None:  # it started from its first neighbour's latent
            info["start"] = f"top-1 neighbour's latent noised to t = {start['timestep']}"
        info["neighbours"] = [
            [{"id": i, "score": round(float(s), 4), "caption": cap}
             for i, s, cap in zip(nb.item_ids[b], nb.scores[b], nb.captions[b])]
            for b in range(len(prompts))]
        info["injection"] = ("h_adapter, lam = " + ", ".join(f"{x:.3f}" for x in lam)
                             if lam is not None else f"slerp, w = {slerp_w:.2f}")
    else:
        images = run(prompts, seeds)
    info["images"] = [str(p) for p in _write_images(np.asarray(images), args.output)]
    print(json.dumps(info, indent=2))
    return 0


def add_parsers(sub, bench) -> None:
    """Add ``generate`` to the top-level subparsers ``sub``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser(
        "generate", help="one-step text-to-image, on ONNX Runtime or PyTorch",
        description="Generate an image in one step at t=999 from a prompt and seed. The initial "
                    "noise comes from NumPy, so both backends start from the same z_T and give "
                    "the same image (within 2/255). With --k > 0 the prompt's neighbours are "
                    "retrieved from --index and their cached H-space features injected: through "
                    "the H-adapter with lambda = strength x top-1 similarity (paper Eq. 5), or, "
                    "for a model without an adapter, by slerp of the top-1 neighbour with "
                    "target weight 1 - strength (paper Eq. 3).",
        formatter_class=fmt)
    g.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="text prompt(s); several prompts are one batch, seeds SEED, SEED+1, ...")
    g.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", type=Path, default=Path("outputs/generate.png"),
                   help="PNG to write (OUT_i.png for several prompts)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="variant name or diffusers folder (torch backend, and the default "
                        "export for onnx)")
    g.add_argument("--onnx", type=Path, default=None,
                   help=f"export folder (default {ONNX_ROOT}/<model name>, exported "
                        "there on first use)")
    g.add_argument("--providers", nargs="+", default=None,
                   help="ONNX Runtime execution providers (tensorrt, cuda, cpu); default: by "
                        "availability")
    g.add_argument("--threads", type=int, default=None, help="CPU threads")
    g.add_argument("--index", type=Path, default=None,
                   help=f"retrieval index folder (default {index_dir_of('<model name>')}, as "
                        "`serve` uses)")
    g.add_argument("--k", type=int, default=0, help="neighbours to retrieve (0: no retrieval)")
    g.add_argument("--rerank", type=int, default=RERANK_CANDIDATES,
                   help="re-rank the dense top N neighbours by the prompt's words (0: dense "
                        "only; the served ensemble's --rerank)")
    g.add_argument("--neighbour-pool", type=int, default=None,
                   help="> 1: the K neighbours drawn from the top K x POOL by each seed (the "
                        "served ensemble's --neighbour-pool); default: the model's (a model "
                        "trained with --start-pool P: P), else 1")
    g.add_argument("--strength", type=float, default=None,
                   help="retrieval strength (adapter: scales lambda, default 1; slerp: weight "
                        "of the neighbour, default 0.2)")
    g.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="generate on a running `imageragturbo serve` through the gRPC SDK "
                        "(--k, --strength, --seed apply; --backend, --model, --onnx, --index "
                        "are the server's)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="with --url: seconds before the request is abandoned")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_generate)
