"""The training commands: ``train base`` and ``train adapter``.

Standard library only at module level (the main CLI imports this for ``--help``); torch and
the training code load inside the handlers (the adapter's defaults for ``--help`` come from
``training.config``, which needs no torch)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, index_dir_of


def _cmd_train_base(args: argparse.Namespace) -> int:
    from imageragturbo.model.family import VARIANTS
    from imageragturbo.training.base import STAGES, Recipe, RecipeConfig

    cfg = RecipeConfig.quick() if args.quick else RecipeConfig()
    if args.threads:
        cfg.threads = args.threads
    if args.unet_layout:
        cfg.unet_layout = args.unet_layout
    stages = args.stages.split(",") if args.stages else list(STAGES)
    recipe = Recipe(args.run_dir, cfg, progress=not args.quiet, reconfigure=args.reconfigure)
    if args.reuse_from:
        recipe.reuse_from(args.reuse_from)
    out = recipe.run(stages)
    print(json.dumps(out, indent=2))
    if args.install:
        src = Path(args.run_dir) / "export" / DEFAULT_MODEL
        if not src.is_dir():
            raise FileNotFoundError(f"{src} missing: run the export stage first")
        dst = VARIANTS[DEFAULT_MODEL]
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        print(f"installed {src} -> {dst}")
    return 0


def _cmd_train_adapter(args: argparse.Namespace) -> int:
    from imageragturbo.training.adapter import AdapterConfig, AdapterRun, install

    kw = {"model": args.model}
    if args.pairs and args.n_train is not None and args.pairs != ["shapesworld"]:
        raise SystemExit("train adapter: --n-train counts ShapesWorld items; with --pairs "
                         "every usable pair is used")
    for key in ("steps", "batch", "k_max", "lora_rank", "synth_prompts", "n_train", "seed",
                "adv_weight", "distill_weight", "real_fraction", "text_drop",
                "scene_neighbour", "real_input", "perceptual_weight", "rerank", "teacher",
                "prompts", "min_image_side", "max_bad_share", "guidance", "synth_steps",
                "neighbour_sdedit", "plain_fraction", "start_pool", "shard_mb", "shuffle_buffer", "mixed_precision", "validation_every",
                "checkpoints_total_limit"):
        if getattr(args, key) is not None:
            kw[key] = str(getattr(args, key)) if key in ("teacher", "prompts") \
                else getattr(args, key)
    if args.pairs:
        kw["pairs"] = tuple(str(p) for p in args.pairs)
    if args.control:
        kw["retrieval"] = "none"
    if args.lam_one:
        kw["lam"] = "one"
    if args.no_lora:
        kw["lora"] = False
    if args.no_perceptual:
        kw["perceptual_weight"] = 0.0
    if args.positional:
        kw["positional"] = True
    if args.decoder_attention:
        kw["decoder_attention"] = True
    if args.neighbour_init:
        kw["neighbour_init"] = True
    if args.threads:
        kw["threads"] = args.threads
    if args.gradient_checkpointing:
        kw["gradient_checkpointing"] = True
    cfg = AdapterConfig.quick(**kw) if args.quick else AdapterConfig(**kw)
    run = AdapterRun(args.run_dir, cfg, index=args.index, data=args.data,
                     progress=not args.quiet, reconfigure=args.reconfigure)
    out = run.run(args.stages.split(",") if args.stages else None)
    print(json.dumps(out, indent=2))
    if args.install:
        dst = install(args.run_dir, args.model)
        print(f"installed {args.run_dir}/export (h_adapter, unet_lora) -> {dst}")
    return 0


def add_parsers(sub, bench) -> None:
    from imageragturbo.training.config import AdapterConfig

    A = AdapterConfig()  # the defaults the help states  # noqa: N806
    tr = sub.add_parser("train", help="train models",
                        description="Training: the tiny ShapesWorld family (`base`) and ImageRAGTurbo's "
                                    "retrieval fine-tuning (`adapter`).")
    tsub = tr.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    b = tsub.add_parser(
        "base", help="train the tiny family: CLIP, VAE, teacher, synthetic data, LADD student",
        description="Train the default tiny model family on ShapesWorld, on the CPU, in stages "
                    "(clip, vae, teacher, synth, student, export). Every stage checkpoints "
                    "and resumes: rerun the same command after an interruption. The result "
                    "is a diffusers folder at RUN_DIR/export/tiny-shapes; --install copies "
                    "it to the package's shipped weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--run-dir", type=Path, default=Path("runs") / DEFAULT_MODEL,
                   help="folder for checkpoints, caches and outputs")
    b.add_argument("--stages", default=None,
                   help="comma-separated subset of clip,vae,teacher,synth,student,export")
    b.add_argument("--quick", action="store_true",
                   help="a few steps per stage on 256 items: checks the recipe end to end")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--unet-layout", choices=("reverse", "sd21"), default=None,
                   help="the UNets' block order: reverse (the shipped tiny-shapes: attention at "
                        "8x8 and 4x4) or sd21 (SD 2.1's rule: none at the lowest level); "
                        "default reverse")
    b.add_argument("--reuse-from", default=None, metavar="MODEL",
                   help="take the clip and vae stages (text encoder, CLIP-score towers, VAE) "
                        "from this model folder or variant instead of training them: new "
                        "UNets on the same text encoder and latent space")
    b.add_argument("--install", action="store_true",
                   help="copy the exported folder to the shipped tiny-shapes weights")
    b.add_argument("--reconfigure", action="store_true",
                   help="accept a changed configuration for a run folder (finished stages "
                        "are kept)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_train_base)

    a = tsub.add_parser(
        "adapter", help="ImageRAGTurbo fine-tuning: H-adapter + decoder LoRA with retrieval",
        description="Fine-tune the one-step student with retrieval (paper Secs. 3.3-3.4): an "
                    "H-space adapter (cross-attention from the target's mid-block feature to "
                    "the retrieved items' cached ones, Eqs. 4-5) and LoRA on the UNet decoder, "
                    "trained with latent adversarial distillation, smooth-L1 distillation and "
                    "a latent perceptual loss (Eq. 10), on real pairs (ShapesWorld's training "
                    "renders by default, or --pairs: your own) and the teacher's samples for "
                    "prompts (the pairs' captions, or --prompts), retrieving from an index "
                    "(for ShapesWorld, of its retrieval split, built when missing; for your "
                    "pairs, --index: one you built with `index build --pairs`). Stages: data, "
                    "neighbours, synth, train, export; every stage resumes after an "
                    "interruption (rerun the same command). --control trains the same thing "
                    "without retrieval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--run-dir", type=Path, default=Path("runs/adapter"),
                   help="folder for checkpoints, caches and outputs")
    a.add_argument("--model", "--student", dest="model", default=DEFAULT_MODEL,
                   help="the one-step student to fine-tune (variant name or diffusers folder, "
                        "e.g. SD-Turbo's)")
    a.add_argument("--teacher", type=Path, default=None,
                   help="the teacher: a diffusers folder whose unet/ is the multi-step teacher "
                        "(e.g. SD 2.1-base for SD-Turbo); it must share the student's text "
                        "encoder, VAE and noise schedule (default: the student folder's "
                        "teacher_unet/, as tiny-shapes has)")
    a.add_argument("--pairs", action="append", default=None, metavar="PATH",
                   help="real text-image pairs (repeatable): .jsonl / .parquet (caption, image, "
                        "optional id per row, as `index build --pairs` reads) or WebDataset "
                        ".tar shards (KEY.jpg|png|webp + KEY.txt or KEY.json with a caption; "
                        "brace ranges like shards/{00000..00009}.tar); images of any size, "
                        "resized and centre-cropped; 'shapesworld' names the default source")
    a.add_argument("--prompts", type=Path, default=None,
                   help="prompts for the teacher's synthetic pairs: a text file (one per line) "
                        "or JSONL with a prompt or caption field (default: the pairs' captions)")
    a.add_argument("--min-image-side", type=int, default=None,
                   help="pairs: skip an image whose shorter side is below this many pixels "
                        "(default: half the student's resolution)")
    a.add_argument("--max-bad-share", type=float, default=None,
                   help="pairs: stop before training when more than this share of the images "
                        f"is missing, corrupt or too small (default {A.max_bad_share:g})")
    a.add_argument("--index", type=Path, default=None,
                   help="retrieval index built with this model (default for ShapesWorld: "
                        f"{index_dir_of('<model>')}, built when missing; needed with --pairs "
                        "or --prompts)")
    a.add_argument("--data", type=Path, default=DATA_ROOT,
                   help="ShapesWorld folder whose retrieval split the default index is built "
                        "from (rendered when missing)")
    a.add_argument("--stages", default=None,
                   help="comma-separated subset of data,neighbours,synth,train,export")
    a.add_argument("--steps", type=int, default=None, help=f"training steps (default {A.steps})")
    a.add_argument("--batch", type=int, default=None, help=f"batch size (default {A.batch})")
    a.add_argument("--k-max", type=int, default=None,
                   help=f"neighbours per target; each step draws k in 1..k-max (default {A.k_max})")
    a.add_argument("--lora-rank", type=int, default=None, help=f"decoder LoRA rank (default {A.lora_rank})")
    a.add_argument("--synth-prompts", type=int, default=None,
                   help=f"teacher samples for training prompts (default {A.synth_prompts})")
    a.add_argument("--synth-steps", type=int, default=None,
                   help=f"the teacher's DDIM steps per synthetic pair (default {A.synth_steps})")
    a.add_argument("--guidance", type=float, default=None,
                   help="the teacher's classifier-free guidance scale for the synthetic pairs "
                        f"(default {A.guidance:g}, ShapesWorld's; the paper's SD 2.1 uses 7.5)")
    a.add_argument("--n-train", type=int, default=None,
                   help=f"ShapesWorld training items used (default {A.n_train})")
    a.add_argument("--seed", type=int, default=None, help="data and initialisation seed")
    a.add_argument("--adv-weight", type=float, default=None,
                   help=f"weight of the LADD term in Eq. 10 (default {A.adv_weight:g}: 1, the "
                        "paper's, measured worse here)")
    a.add_argument("--distill-weight", type=float, default=None,
                   help=f"alpha of Eq. 10 (default {A.distill_weight:g}; the paper's is 2.5)")
    a.add_argument("--real-fraction", type=float, default=None,
                   help=f"share of real pairs per batch (default {A.real_fraction:g}; more "
                        "measured worse on ShapesWorld; the rest are the teacher's synthetic "
                        "pairs)")
    a.add_argument("--text-drop", type=float, default=None,
                   help="share of each batch for which the student sees the empty prompt, so "
                        f"the neighbours are its only source of the content (default {A.text_drop:g})")
    a.add_argument("--scene-neighbour", type=float, default=None,
                   help="augmentation: share of the teacher targets whose neighbours are a "
                        "jittered re-render of the prompt's own scene (never an index item); "
                        "> 0 also gives every real target its scene's re-render "
                        f"(default {A.scene_neighbour:g})")
    a.add_argument("--rerank", type=int, default=None,
                   help="neighbours: re-rank the dense top N by the caption's words, as "
                        f"served (0: dense only; default {A.rerank})")
    a.add_argument("--real-input", choices=("noised", "noise"), default=None,
                   help="the student's input for real pairs: q(z_999 | z_0) or pure noise "
                        f"(default {A.real_input})")
    a.add_argument("--perceptual-weight", type=float, default=None,
                   help=f"beta of Eq. 10 (default {A.perceptual_weight:g}; 0 drops Eq. 9)")
    a.add_argument("--positional", action="store_true",
                   help="the adapter's tokens carry their 2-D position (needed to carry a "
                        "neighbour's layout over)")
    a.add_argument("--neighbour-sdedit", type=float, default=None, metavar="STRENGTH",
                   help="beyond the paper: start the teacher's synthetic targets from each "
                        "target's top-1 neighbour (SDEdit at STRENGTH in (0, 1]) instead of from "
                        "noise, so the neighbour shows the target's layout (default 0: the "
                        "paper's pairs)")
    a.add_argument("--neighbour-init", action="store_true",
                   help="beyond the paper (with --neighbour-sdedit): the student learns the "
                        "teacher's SDEdit in one step, starting from the top-1 neighbour's "
                        "latent noised to the SDEdit timestep; retrieval on serves that start, "
                        "retrieval off pure noise at t = 999")
    a.add_argument("--plain-fraction", type=float, default=None, metavar="SHARE",
                   help="beyond the paper (with --neighbour-init): this share of the teacher "
                        "targets are its plain samples from noise, learnt at t = 999 with "
                        "retrieval off, so the served K = 0 path stays a working student "
                        f"(default {A.plain_fraction:g})")
    a.add_argument("--start-pool", type=int, default=None, metavar="P",
                   help="beyond the paper (with --neighbour-sdedit): each target's SDEdit "
                        "starts from one of its top P neighbours, drawn by the run's seed, so "
                        "the model learns to correct neighbours it is served with "
                        "`serve --neighbour-pool P` (one drawn by the request's seed; more "
                        f"variety across seeds) (default {A.start_pool})")
    a.add_argument("--decoder-attention", action="store_true",
                   help="beyond the paper: the UNet decoder's cross-attention layers also attend "
                        "to the neighbours' tokens (decoupled, IP-Adapter style), trained with "
                        "the H-adapter; exported as neighbour_attention/")
    a.add_argument("--control", action="store_true",
                   help="the no-retrieval control: the target's own H feature in place of the "
                        "retrieved ones (same parameters, data, losses and steps)")
    a.add_argument("--lam-one", action="store_true",
                   help="ablation: lambda = 1 instead of the retrieval similarity (Eq. 5)")
    a.add_argument("--no-lora", action="store_true", help="ablation: the adapter only")
    a.add_argument("--no-perceptual", action="store_true",
                   help="ablation: without the latent perceptual loss (Eq. 9)")
    a.add_argument("--shard-mb", type=float, default=None,
                   help="data and synth caches: shards of about this many MiB, streamed in "
                        f"training so memory does not grow with the data (default {A.shard_mb:g})")
    a.add_argument("--shuffle-buffer", type=int, default=None,
                   help="training: items in each stream's shuffle buffer (shards come in a "
                        f"seeded random order; default {A.shuffle_buffer})")
    a.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="training's forward passes under bf16 or fp16 autocast (fp16: CUDA "
                        f"only; default {A.mixed_precision})")
    a.add_argument("--validation-every", type=int, default=None, metavar="N",
                   help="every N training steps a PNG grid of a few prompts with and without "
                        "retrieval in RUN/train/validation/ (default 0: none)")
    a.add_argument("--checkpoints-total-limit", type=int, default=None, metavar="N",
                   help="training checkpoints (accelerator.save_state, every ckpt_every "
                        f"steps) kept, the newest (default {A.checkpoints_total_limit})")
    a.add_argument("--gradient-checkpointing", action="store_true",
                   help="the student UNet recomputes its activations in backward: less "
                        "memory, more compute")
    a.add_argument("--quick", action="store_true",
                   help="a few steps of every stage on 64 items: checks the recipe end to end")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a.add_argument("--install", action="store_true",
                   help="copy the adapter and the decoder LoRA into the model folder, which "
                        "then serves as ImageRAGTurbo")
    a.add_argument("--reconfigure", action="store_true",
                   help="accept a changed configuration for a run folder (finished stages "
                        "are kept)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=_cmd_train_adapter)
