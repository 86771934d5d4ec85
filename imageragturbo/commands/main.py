"""The ``imageragturbo`` command: one entry point, a subcommand per job (``--help`` on each).
This module holds the entry point and the ``data``, ``eval``, ``bench quality`` and ``bench
sensitivity`` subcommands; the other command groups each have a module beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, index_dir_of

from . import export, generate, index, serve, train

# The command groups with a module of their own: each defines ``add_parsers(sub, bench)``
# where ``sub`` is the top-level subparsers object and ``bench`` the ``bench`` group's.
GROUPS = (
    index,      # index build / query / verify, bench retrieval
    train,      # train base, train adapter
    export,     # export, bench pipeline, bench sdturbo-gpu
    generate,   # generate
    serve,      # serve, demo (the served ensemble), bench serve, bench soak
)


# ----------------------------------------------------------------------------- data


def _cmd_data_build(args: argparse.Namespace) -> int:
    from imageragturbo import shapesworld as sw

    counts = {"train": args.train, "retrieval": args.retrieval, "eval": args.eval}
    t0 = time.perf_counter()
    out = sw.build_dataset(args.out, counts, seed=args.seed, resolution=args.resolution,
                           workers=args.workers, progress=not args.quiet,
                           overwrite=args.overwrite)
    items = sw.make_split("eval", min(24, args.eval), args.seed)
    grid = sw.sample_grid(items, out / "samples.png") if items else None
    world = json.loads((out / "world.json").read_text())
    summary = {s: {"items": v["items"], "objects_by_class": v["objects_by_class"]}
               for s, v in world["splits"].items()}
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 1),
                      "splits": summary, "grid": str(grid) if grid else None}, indent=2))
    return 0


def _cmd_data_grid(args: argparse.Namespace) -> int:
    from imageragturbo import shapesworld as sw

    items = sw.make_split(args.split, args.n, args.seed)
    path = sw.sample_grid(items, args.output, cols=args.cols)
    print(path)
    return 0


# ----------------------------------------------------------------------------- eval


def _cmd_eval_selfcheck(args: argparse.Namespace) -> int:
    from imageragturbo import tifa

    res = tifa.selfcheck(n=args.n, seed=args.seed, resolution=args.resolution,
                         blur=args.blur, noise=args.noise)
    if args.plot:
        tifa.plot_categories(res, args.plot, title="ShapesTIFA self-check")
    if args.json:
        print(json.dumps({k: v["tifa"] for k, v in res.items()}))
    else:
        _print_table({k: v for k, v in res.items()})
        if args.plot:
            print(f"histogram: {args.plot}")
    return 0


def _cmd_eval_score(args: argparse.Namespace) -> int:
    from imageragturbo import tifa

    res = tifa.score_folder(args.dataset, args.images, split=args.split)
    if args.plot:
        tifa.plot_categories({Path(args.images).name: res}, args.plot)
    if args.json:
        print(tifa.dumps(res, per_prompt=args.per_prompt))
    else:
        _print_table({Path(args.images).name: res})
    return 0


def _cmd_eval_run(args: argparse.Namespace) -> int:
    from imageragturbo import evaluate, tifa

    res = evaluate.run(args.model, args.pipeline, args.steps, args.guidance, args.n, args.seed,
                       grid=args.grid, progress=not args.json, k=args.k,
                       strength=args.strength, index=args.index)
    name = f"{args.pipeline} x{args.steps}"
    if args.plot:
        tifa.plot_categories({name: res}, args.plot)
    if args.json:
        res.pop("per_prompt", None)
        print(json.dumps(res))
    else:
        _print_table({name: res})
        print(f"FD {res['fd']:.3f}   CLIP {res['clip']:.4f}")
    return 0


def _cmd_eval_compare(args: argparse.Namespace) -> int:
    from imageragturbo import evaluate

    print(evaluate.compare_grid(args.model, args.n, args.seed, args.output, args.steps,
                                args.guidance))
    return 0


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    """The paper's Table 2 rows on ShapesWorld, same prompts and seeds, in one run."""
    from imageragturbo import quality, tifa

    if args.latency_only:
        lat = quality.latency_only(args.model, args.index)
        if args.json:
            text = json.dumps(lat, indent=1) + "\n"
            if args.json == "-":
                print(text, end="")
                return 0
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        print(f"ONNX Runtime CPU, 1 thread, batch 1, median ms: student {lat['student_k0']:.1f}; "
              f"ImageRAGTurbo K = 0 {lat['imageragturbo_k0']:.1f}, "
              f"k = 1 {lat['imageragturbo_k1']:.1f} ({lat['ratio_k1_vs_k0']:.2f}x), "
              f"k = 4 {lat['imageragturbo_k4']:.1f} ({lat['ratio_k4_vs_k0']:.2f}x); "
              f"H-adapter FLOPs k = 4: {lat['flops']['h_adapter_k4_share']:.2%} of a request")
        return 0
    runs = dict(r.rsplit("=", 1) for r in args.run)
    if args.control:
        runs["control (no retrieval)"] = args.control
    results = quality.run(args.model, args.n, args.seed, args.teacher_steps, args.guidance,
                          index=args.index, runs=runs, grid=args.grid,
                          latency=not args.no_latency, progress=args.json != "-",
                          seeds=args.seeds, retrieval_guidance=args.retrieval_guidance,
                          neighbour_pools=args.neighbour_pool, runs_only=args.runs_only)
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    if args.plot:
        tifa.plot_categories(rows, args.plot, title=f"ShapesTIFA by category ({args.model})")
    table = quality.markdown_table(results)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json == "-":
        print(json.dumps(results))
        return 0
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(table, end="")
    return 0


def _cmd_bench_sensitivity(args: argparse.Namespace) -> int:
    from imageragturbo import sensitivity

    results = {m: sensitivity.run(m, args.n, args.seed, progress=not args.json)
               for m in (args.model or [DEFAULT_MODEL])}
    print(json.dumps(results) if args.json else sensitivity.markdown(results), end="")
    return 0


def _print_table(results: dict[str, dict]) -> None:
    from imageragturbo.tifa import CATEGORIES

    cats = [c for c in CATEGORIES if any(c in r["categories"] for r in results.values())]
    w = max(12, *(len(n) for n in results))
    head = f"{'':{w}s} {'TIFA':>6s} " + " ".join(f"{c[:8]:>8s}" for c in cats)
    print(head)
    for name, r in results.items():
        row = " ".join(f"{r['categories'].get(c, float('nan')):8.3f}" for c in cats)
        print(f"{name:{w}s} {r['tifa']:6.3f} {row}")


# ----------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    """The ShapesWorld demo: a grid of evaluation prompts with their renders, and the
    scorer's self-check histogram."""
    from imageragturbo import shapesworld as sw
    from imageragturbo import tifa

    out = Path(args.out)
    items = sw.make_split("eval", 24, args.seed)
    grid = sw.sample_grid(items, out / "shapesworld_samples.png")
    res = tifa.selfcheck(n=args.n, seed=args.seed)
    hist = tifa.plot_categories(res, out / "shapestifa_selfcheck.png",
                                title="ShapesTIFA self-check")
    _print_table(res)
    print(f"samples grid: {grid}\nhistogram:    {hist}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imageragturbo",
        description="ImageRAGTurbo: one-step, retrieval-augmented text-to-image generation. "
                    "Each subcommand has its own --help.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # data
    data = sub.add_parser("data", help="generate the ShapesWorld data set",
                          description="ShapesWorld: deterministic scenes of coloured shapes "
                                      "with captions, in train / retrieval / eval splits.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = dsub.add_parser(
        "build", help="write the splits (PNG files + JSONL manifests + world.json)",
        description="Write the ShapesWorld splits to a folder: <split>/<index>.png, "
                    "<split>.jsonl (id, caption, image path, scene spec, tail combos), "
                    "world.json (vocabulary, split statistics, manifest checksums) and "
                    "samples.png. The same seed gives the same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--out", type=Path, default=DATA_ROOT, help="output folder")
    b.add_argument("--seed", type=int, default=0, help="world seed")
    b.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    b.add_argument("--train", type=int, default=20000, help="training items (long tail)")
    b.add_argument("--retrieval", type=int, default=10000,
                   help="retrieval database items (covers the tail)")
    b.add_argument("--eval", type=int, default=500, help="evaluation prompts")
    b.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_data_build)
    g = dsub.add_parser("grid", help="a PNG grid of samples with their captions",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--split", default="eval", choices=["train", "retrieval", "eval"])
    g.add_argument("--n", type=int, default=24, help="number of samples")
    g.add_argument("--cols", type=int, default=6)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", type=Path, default=Path("outputs/samples.png"))
    g.set_defaults(func=_cmd_data_grid)
    d = dsub.add_parser("demo", help="ShapesWorld sample grid and scorer self-check, as PNGs",
                        description="The data world at a glance: a grid of evaluation prompts "
                                    "with their renders, and the ShapesTIFA self-check "
                                    "histogram. (`imageragturbo demo` is the served model.)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    d.add_argument("--n", type=int, default=500, help="evaluation prompts for the self-check")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    # eval
    ev = sub.add_parser("eval", help="ShapesTIFA scoring",
                        description="ShapesTIFA: TIFA-style questions from each scene spec, "
                                    "answered by a detector from the pixels.")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    sc = esub.add_parser(
        "selfcheck", help="score known-answer images: clean, degraded, noise, blank, perturbed",
        description="Checks the measuring stick: the evaluation prompts scored on clean "
                    "renders (should be ~1), blurred+noised renders (robustness), Gaussian "
                    "noise and blank images (should be ~0), and renders with one stated "
                    "attribute changed (should drop clearly).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument("--n", type=int, default=500, help="evaluation prompts")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--resolution", type=int, default=64)
    sc.add_argument("--blur", type=float, default=1.0,
                    help="Gaussian blur sigma of the degraded variant, in pixels at 64x64")
    sc.add_argument("--noise", type=float, default=0.04,
                    help="additive Gaussian noise std of the degraded variant (0-1 scale)")
    sc.add_argument("--json", action="store_true",
                    help="print one JSON object {variant: score} and nothing else")
    sc.add_argument("--plot", type=Path, default=None, help="write a per-category histogram PNG")
    sc.set_defaults(func=_cmd_eval_selfcheck)
    s = esub.add_parser(
        "score", help="score a folder of generated images against a data set's prompts",
        description="Images are looked up as <images>/<id>.png, one per prompt of the split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("dataset", type=Path, help="data set folder (from `data build`)")
    s.add_argument("--images", type=Path, required=True, help="folder of <id>.png")
    s.add_argument("--split", default="eval")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--per-prompt", action="store_true", help="include per-prompt accuracy")
    s.add_argument("--plot", type=Path, default=None, help="write a per-category histogram PNG")
    s.set_defaults(func=_cmd_eval_score)

    r = esub.add_parser(
        "run", help="generate the evaluation prompts with a pipeline and score them",
        description="Generates the ShapesWorld evaluation prompts with the teacher (N DDIM "
                    "steps, classifier-free guidance), the one-step student, ImageRAGTurbo "
                    "(--pipeline adapter) or the student with slerp injection, and measures "
                    "ShapesTIFA, the Frechet distance to real renders (FID's analogue) and the "
                    "CLIP-score analogue. --json prints {tifa, categories, fd, clip, ...}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--model", default=DEFAULT_MODEL, help="variant name or diffusers folder")
    r.add_argument("--pipeline", choices=["teacher", "student", "adapter", "slerp"],
                   default="student",
                   help="adapter: ImageRAGTurbo (trained H-adapter + decoder LoRA); slerp: the "
                        "student with training-free slerp injection of the top-1 neighbour")
    r.add_argument("--k", type=int, default=4, help="neighbours (adapter; slerp uses the top 1)")
    r.add_argument("--strength", type=float, default=None,
                   help="adapter: scales lambda (default 1); slerp: 1 - w (default 0.2)")
    r.add_argument("--index", type=Path, default=None,
                   help=f"retrieval index (default: {index_dir_of('<model>')})")
    r.add_argument("--steps", type=int, default=1, help="denoising steps (student: 1)")
    r.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale")
    r.add_argument("--n", type=int, default=500, help="evaluation prompts")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--grid", type=Path, default=None, help="write a PNG grid of 24 samples")
    r.add_argument("--plot", type=Path, default=None, help="write a per-category histogram PNG")
    r.set_defaults(func=_cmd_eval_run)

    cmp_ = esub.add_parser(
        "compare", help="a PNG grid: teacher xN, teacher x1, student x1 and the render per prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cmp_.add_argument("--model", default=DEFAULT_MODEL, help="variant name or diffusers folder")
    cmp_.add_argument("--n", type=int, default=8, help="evaluation prompts (columns)")
    cmp_.add_argument("--steps", type=int, default=50, help="teacher steps of the first row")
    cmp_.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale")
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("-o", "--output", type=Path, default=Path("outputs/compare.png"))
    cmp_.set_defaults(func=_cmd_eval_compare)


    bench = sub.add_parser("bench", help="benchmarks (JSON figures for the README)",
                           description="Benchmarks. Each prints its figures; --json for one "
                                       "JSON object.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    q = bench_sub.add_parser(
        "quality", help="the paper's Table 2 on ShapesWorld: teacher, student, slerp, "
                        "ImageRAGTurbo, control",
        description="Generates the evaluation prompts, each under --seeds noise seeds (same "
                    "prompts and seeds for every row), with the teacher at N steps and at 1 "
                    "step, the one-step student, the student with slerp injection at w = 0.8 "
                    "and with the per-prompt oracle w* (also cross-fitted across seeds, and "
                    "both with a random non-neighbour: the null oracle), ImageRAGTurbo (the "
                    "installed adapter and decoder LoRA) at k = 1 and k = 4 and with retrieval "
                    "off (K = 0), and any --control / --run folders (each with its K = 0 row); "
                    "measures ShapesTIFA (overall, per category, on prompts whose rarest "
                    "combination is absent / rare / common in training) with paired bootstrap "
                    "95% intervals against the student and against retrieval off, FD, the "
                    "CLIP-score analogue, diversity across seeds, NFE, and the one-step ONNX "
                    "Runtime CPU latency with and without retrieval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--model", default=DEFAULT_MODEL, help="variant name or diffusers folder")
    q.add_argument("--teacher-steps", type=int, default=50)
    q.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale")
    q.add_argument("--n", type=int, default=500, help="evaluation prompts")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--index", type=Path, default=None,
                   help=f"retrieval index (default: {index_dir_of('<model>')}, built when "
                        "missing)")
    q.add_argument("--control", type=Path, default=None,
                   help="the no-retrieval control run's export folder (train adapter --control)")
    q.add_argument("--run", action="append", default=[], metavar="NAME=FOLDER",
                   help="an extra row: another adapter run's export folder (ablations), "
                        "served with retrieval at k = 4 (FOLDER@K: at k = K), with its own "
                        "K = 0 row; repeatable")
    q.add_argument("--grid", type=Path, default=None,
                   help="write a PNG: student | slerp | ImageRAGTurbo | the 4 neighbours | "
                        "render, per prompt")
    q.add_argument("--retrieval-guidance", type=float, action="append", default=[],
                   metavar="SCALE",
                   help="an extra row: the installed model at k = 4 with classifier-free "
                        "guidance on retrieval, z0 = z0(K=0) + SCALE (z0(k=4) - z0(K=0)) (two "
                        "decoder passes, in-process only; not the paper's); repeatable")
    q.add_argument("--neighbour-pool", type=int, action="append", default=[], metavar="POOL",
                   help="an extra row: the installed model (and each --run) at k = 1 with the "
                        "neighbour drawn by each image's seed from the prompt's top POOL (serve "
                        "--neighbour-pool); repeatable")
    q.add_argument("--no-latency", action="store_true", help="skip the ONNX latency columns")
    q.add_argument("--latency-only", action="store_true",
                   help="only the latency columns: the one-step ONNX Runtime CPU request "
                        "(text encoder, retrieval, one step) of the student and of the installed "
                        "model at K = 0, 1, 4, their ratios and the FLOPs, in one run, scoring "
                        "no images (a minute; run it with nothing else on the CPU)")
    q.add_argument("--runs-only", action="store_true",
                   help="only the student and the --run/--control rows (each with its K = 0 "
                        "row): compares training runs in minutes, without the teacher, slerp, "
                        "oracle and installed-model rows")
    q.add_argument("--seeds", type=int, default=3,
                   help="noise seeds per prompt (seed j of prompt i: seed * 1e6 + i + j * 1e5); "
                        "a prompt's score is the mean over them")
    q.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write every figure, per-prompt scores included, as JSON to PATH "
                        "(e.g. docs/results/quality.json); bare --json prints it instead of "
                        "the table")
    q.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                   help="write the table as Markdown (e.g. docs/results/quality.md)")
    q.add_argument("--plot", type=Path, default=None, help="write a per-category histogram PNG")
    q.set_defaults(func=_cmd_bench_quality)

    sens = bench_sub.add_parser(
        "sensitivity", help="which route through the student's UNet carries the prompt: h, "
                            "skips or the decoder's text",
        description="Forward passes of the one-step student (as distilled): the relative "
                    "change of z_0 when h is zeroed, replaced by the top-1 neighbour's "
                    "(slerp w = 0) or by another prompt's, and when the skips or the "
                    "decoder's text come from another prompt. An H-space edit can only "
                    "work where the decoder reads h.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sens.add_argument("--model", action="append", default=None, metavar="MODEL",
                      help=f"variant or diffusers folder; repeatable (default {DEFAULT_MODEL})")
    sens.add_argument("--n", type=int, default=64, help="evaluation prompts")
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--json", action="store_true", help="print one JSON object")
    sens.set_defaults(func=_cmd_bench_sensitivity)

    for group in GROUPS:
        group.add_parsers(sub, bench_sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"imageragturbo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imageragturbo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
