"""The export commands: ``export``, ``bench pipeline`` and ``bench sdturbo-gpu``.

Standard library only at module level (the main CLI imports this for ``--help``); torch,
onnx and onnxruntime load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imageragturbo.defaults import DEFAULT_MODEL, ONNX_ROOT, export_dir_of

TWO_GB = 2 * 1024**3


def _default_onnx_dir(model: str, random_weights: bool = False) -> Path:
    out = export_dir_of(model)
    return out.with_name(f"{out.name}-random") if random_weights else out


def _cmd_export(args: argparse.Namespace) -> int:
    from imageragturbo.export.onnx_export import export_model, random_tiny_components
    from imageragturbo.runtime.pipeline import describe

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


def _cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from imageragturbo.export.bench import bench_pipeline, format_table

    res = bench_pipeline(args.model, args.random_weights, args.batch, args.repeats, args.warmup,
                         args.threads, args.k, args.providers, progress=not args.json)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from imageragturbo.export import gpu_bench

    if args.dry_run:
        res = gpu_bench.dry_run(args.upcast_attention, args.batch[0])
        print(json.dumps(res) if args.json else json.dumps(res, indent=2))
        return 0
    from imageragturbo.export.gpu_report import format_summary, write_report

    written: dict = {}   # the report, rewritten after each configuration (a killed run keeps it)
    res = gpu_bench.run_gpu_bench(args.out, args.providers, args.repeats, args.warmup,
                                  args.batch, args.k, args.upcast_attention,
                                  progress=not args.json, reuse_export=args.reuse_export,
                                  cuda_graph=not args.no_cuda_graph,
                                  torch_eager=not args.no_torch, device=args.device,
                                  checkpoint=(lambda r: written.update(write_report(
                                      r, args.report))) if args.report else None)
    if args.report:
        paths = written or write_report(res, args.report)  # written already after the last one
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(json.dumps(res) if args.json else format_summary(res))
    return 0


def add_parsers(sub, bench) -> None:
    """Add ``export`` to the top-level subparsers ``sub``, ``pipeline`` and ``sdturbo-gpu`` to
    the ``bench`` group's subparsers."""
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
                   help=f"output folder (default {ONNX_ROOT}/<model name>)")
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
                    "fp16 once and time, in one run on one GPU: PyTorch eager fp16, ONNX Runtime "
                    "CUDA (numpy between stages), the same with IO binding, the fixed-shape "
                    "profile with CUDA graphs per batch, and TensorRT if asked; per stage and end "
                    "to end, without and with retrieval, with peak GPU memory and Memcpy nodes "
                    "per graph. Needs a GPU and onnxruntime-gpu; --dry-run only constructs the "
                    "models on the meta device and traces shapes.",
        formatter_class=fmt)
    s.add_argument("--dry-run", action="store_true",
                   help="construct on the meta device and report parameters and shapes")
    s.add_argument("--out", type=Path, default=None,
                   help="keep the export in this folder (default: a temporary one)")
    s.add_argument("--providers", nargs="+", default=["cuda"],
                   help="ONNX Runtime providers to time (add tensorrt when its libraries are "
                        "there: its engine builds take minutes)")
    s.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes")
    s.add_argument("--k", type=int, default=1, help="retrieved features per prompt")
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--report", type=Path, default=None,
                   help="write sdturbo_gpu.json, .png (latency breakdown) and .txt here")
    s.add_argument("--reuse-export", action="store_true",
                   help="with --out: keep an export already there instead of exporting again")
    s.add_argument("--no-cuda-graph", action="store_true",
                   help="fixed-shape profile without CUDA graphs")
    s.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same run on the SD 2.1-layout toy with the CPU provider (a "
                        "smoke test of the script, not a measurement)")
    s.add_argument("--upcast-attention", action="store_true",
                   help="SD 2.1-768 style: attention upcast, kept fp32 in the fp16 export")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    s.set_defaults(func=_cmd_bench_gpu)
