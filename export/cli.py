"""Subcommands of the export part: ``export``, ``generate``, ``bench pipeline`` and
``bench sdturbo-gpu``.

Standard library only at module level (the main CLI imports this for ``--help``); torch,
onnx and onnxruntime load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "tiny-shapes"
DEFAULT_ONNX_ROOT = Path("runs/onnx")
DEFAULT_INDEX = Path("data/index/shapesworld")  # the retriever's default index folder
TWO_GB = 2 * 1024**3


def _default_onnx_dir(model: str, random_weights: bool = False) -> Path:
    name = Path(model).name or "model"
    return DEFAULT_ONNX_ROOT / (f"{name}-random" if random_weights else name)


def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_model, random_tiny_components
    from .runtime import describe

    out = args.out or _default_onnx_dir(args.model, args.random_weights)
    if args.random_weights:
        if args.model != DEFAULT_MODEL:
            raise ValueError("--random-weights exports the default tiny architecture; "
                             "do not combine it with --model")
        c = random_tiny_components(args.seed)
    else:
        from imageragturbo.model import family

        c = family.load_components(args.model)
    fp32_att = {"auto": None, "on": True, "off": False}[args.fp32_attention]
    export_model(c, out, source=args.model, opset=args.opset, fp16=args.fp16,
                 fp32_attention=fp32_att, fresh_adapter=args.fresh_adapter,
                 external_data_threshold=args.external_data_threshold,
                 overwrite=args.overwrite, progress=not args.quiet)
    print(describe(out))
    return 0


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

    from . import runtime

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
        folder = args.onnx or _default_onnx_dir(args.model)
        if not (folder / "manifest.json").exists():
            if args.onnx:
                raise FileNotFoundError(f"no ONNX export at {folder}; run `imageragturbo "
                                        f"export --out {folder}`")
            from .onnx_export import export_from_model

            print(f"exporting {args.model} to {folder} (once)", file=sys.stderr)
            export_from_model(args.model, folder, progress=not args.quiet)
        pipe = runtime.OnnxPipeline(folder, providers=args.providers, threads=args.threads)
        info["providers"] = pipe.active_providers
        text_dim = int(pipe.manifest["text_dim"])
        h_shape, has_adapter = pipe.h_shape, pipe.has_adapter

        def pooled_of(ps):
            return pipe.encode_prompt(ps)[1]

        def run(h_retr=None, lam=None, slerp_w=None):
            return pipe.generate(prompts, seeds, h_retr=h_retr, lam=lam, slerp_w=slerp_w)
    else:
        import torch

        from imageragturbo.model import family
        from imageragturbo.model.pipeline import encode_prompt, latent_shape, student_generate

        if args.threads:
            torch.set_num_threads(args.threads)
        c = family.load_components(args.model)
        text_dim = int(c.text_encoder.config.hidden_size)
        has_adapter = c.h_adapter is not None

        def pooled_of(ps):
            return encode_prompt(c, ps)[1].numpy()

        def run(h_retr=None, lam=None, slerp_w=None):
            ht = None if h_retr is None else torch.from_numpy(h_retr)
            lt = None if lam is None else torch.from_numpy(lam)
            return student_generate(c, prompts, seeds, h_retr=ht, lam=lt, slerp_w=slerp_w)

        cfg = c.unet.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        _, lh, lw = latent_shape(c)
        h_shape = (int(cfg.block_out_channels[-1]), lh // down, lw // down)  # (C, h', w')
    if args.k > 0:
        index = runtime.load_index(args.index, text_dim, h_shape)
        h_retr, scores, nb = runtime.retrieve(index, pooled_of(prompts), args.k)
        lam, slerp_w = runtime.retrieval_controls(scores, args.strength, has_adapter)
        images = run(h_retr, lam, slerp_w)
        info["neighbours"] = [
            [{"id": i, "score": round(float(s), 4), "caption": cap}
             for i, s, cap in zip(nb.item_ids[b], nb.scores[b], nb.captions[b])]
            for b in range(len(prompts))]
        info["injection"] = ("h_adapter, lam = " + ", ".join(f"{x:.3f}" for x in lam)
                             if lam is not None else f"slerp, w = {slerp_w:.2f}")
    else:
        images = run()
    info["images"] = [str(p) for p in _write_images(np.asarray(images), args.output)]
    print(json.dumps(info, indent=2))
    return 0


def _cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from .bench import bench_pipeline, format_table

    res = bench_pipeline(args.model, args.random_weights, args.batch, args.repeats, args.warmup,
                         args.threads, args.k, args.providers, progress=not args.json)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from . import gpu_bench

    if args.dry_run:
        res = gpu_bench.dry_run(args.upcast_attention, args.batch)
    else:
        res = gpu_bench.run_gpu_bench(args.out, args.providers, args.repeats, args.warmup,
                                      args.batch, args.k, args.upcast_attention,
                                      progress=not args.json)
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))
    return 0


def add_parsers(sub, bench) -> None:
    """Add ``export`` and ``generate`` to the top-level subparsers ``sub``, ``pipeline`` and
    ``sdturbo-gpu`` to the ``bench`` group's subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    e = sub.add_parser(
        "export", help="export the five served stages to ONNX",
        description="Export text_encoder, unet_encoder, h_adapter (when the model has one, or "
                    "with --fresh-adapter), unet_decoder (with the one-step update to z0 in the "
                    "graph) and vae_decoder (1/scaling_factor in the graph) to ONNX with named "
                    "inputs/outputs and a dynamic batch axis (and a dynamic k axis on h_retr), "
                    "plus tokenizer/ and manifest.json (shapes, opset, dtype, source model "
                    "identity, sha256 per file).",
        formatter_class=fmt)
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="variant name (tiny-shapes) or a local diffusers folder (SD 2.1 layout)")
    e.add_argument("--random-weights", action="store_true",
                   help="export the default tiny architecture with random weights (while "
                        "tiny-shapes is not trained yet)")
    e.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    e.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_ONNX_ROOT}/<model name>)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset")
    e.add_argument("--fp16", action="store_true",
                   help="fp16 weights and compute (GPU profile); inputs/outputs stay float32")
    e.add_argument("--fp32-attention", choices=["auto", "on", "off"], default="auto",
                   help="with --fp16, keep attention scores/softmax in fp32 (auto: when the "
                        "UNet config has upcast_attention, as SD 2.x 768 models need)")
    e.add_argument("--fresh-adapter", action="store_true",
                   help="export a zero-initialised H-adapter sized for the mid-block when the "
                        "model has none")
    e.add_argument("--external-data-threshold", type=int, default=TWO_GB,
                   help="bytes of weights above which a graph's tensors go to <stage>.onnx.data")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_export)

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
                   help=f"export folder (default {DEFAULT_ONNX_ROOT}/<model name>, exported "
                        "there on first use)")
    g.add_argument("--providers", nargs="+", default=None,
                   help="ONNX Runtime execution providers (tensorrt, cuda, cpu); default: by "
                        "availability")
    g.add_argument("--threads", type=int, default=None, help="CPU threads")
    g.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="retrieval index folder")
    g.add_argument("--k", type=int, default=0, help="neighbours to retrieve (0: no retrieval)")
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

    b = bench.add_parser(
        "pipeline", help="per-stage and end-to-end latency, PyTorch eager vs ONNX Runtime",
        description="Median latency of each of the five stages and of the whole one-step "
                    "request (tokenize to uint8 image, with the H-adapter on k random "
                    "retrieved features), PyTorch eager and ONNX Runtime, each batch size, in "
                    "one run. Also reports the largest pixel difference between the two.",
        formatter_class=fmt)
    b.add_argument("--model", default=DEFAULT_MODEL, help="variant name or diffusers folder")
    b.add_argument("--random-weights", action="store_true",
                   help="measure the default tiny architecture with random weights")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    b.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    b.add_argument("--threads", type=int, default=None,
                   help="threads for both backends (default: each library's own)")
    b.add_argument("--k", type=int, default=1, help="retrieved features per prompt")
    b.add_argument("--providers", nargs="+", default=None, help="ONNX Runtime providers")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_pipeline)

    s = bench.add_parser(
        "sdturbo-gpu", help="SD-Turbo-sized fp16 one-step latency with CUDA / TensorRT (GPU)",
        description="Build an SD-Turbo-sized model with random weights (SD 2.1 UNet, "
                    "OpenCLIP-H text encoder, SD VAE, 36 M-parameter H-adapter), export it in "
                    "fp16 and report per-stage and one-step latency at 512x512 with the CUDA "
                    "and TensorRT execution providers. Needs a GPU and onnxruntime-gpu; "
                    "--dry-run only constructs the models on the meta device and traces shapes.",
        formatter_class=fmt)
    s.add_argument("--dry-run", action="store_true",
                   help="construct on the meta device and report parameters and shapes")
    s.add_argument("--out", type=Path, default=None,
                   help="keep the export in this folder (default: a temporary one)")
    s.add_argument("--providers", nargs="+", default=["cuda", "tensorrt"])
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--k", type=int, default=1, help="retrieved features per prompt")
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--upcast-attention", action="store_true",
                   help="SD 2.1-768 style: attention upcast, kept fp32 in the fp16 export")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    s.set_defaults(func=_cmd_bench_gpu)
