"""``imageragturbo train ...`` subcommands (registered by the main CLI)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _cmd_train_base(args: argparse.Namespace) -> int:
    from imageragturbo.model.family import VARIANTS

    from .base import STAGES, Recipe, RecipeConfig

    cfg = RecipeConfig.quick() if args.quick else RecipeConfig()
    if args.threads:
        cfg.threads = args.threads
    stages = args.stages.split(",") if args.stages else list(STAGES)
    recipe = Recipe(args.run_dir, cfg, progress=not args.quiet, reconfigure=args.reconfigure)
    out = recipe.run(stages)
    print(json.dumps(out, indent=2))
    if args.install:
        src = Path(args.run_dir) / "export" / "tiny-shapes"
        if not src.is_dir():
            raise FileNotFoundError(f"{src} missing: run the export stage first")
        dst = VARIANTS["tiny-shapes"]
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        print(f"installed {src} -> {dst}")
    return 0


def add_parsers(sub, bench) -> None:
    tr = sub.add_parser("train", help="train models",
                        description="Training: the tiny ShapesWorld family (`base`).")
    tsub = tr.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    b = tsub.add_parser(
        "base", help="train the tiny family: CLIP, VAE, teacher, synthetic data, LADD student",
        description="Train the default tiny model family on ShapesWorld, on the CPU, in stages "
                    "(clip, vae, teacher, synth, student, export). Every stage checkpoints "
                    "and resumes: rerun the same command after an interruption. The result "
                    "is a diffusers folder at RUN_DIR/export/tiny-shapes; --install copies "
                    "it to the package's shipped weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--run-dir", type=Path, default=Path("runs/tiny-shapes"),
                   help="folder for checkpoints, caches and outputs")
    b.add_argument("--stages", default=None,
                   help="comma-separated subset of clip,vae,teacher,synth,student,export")
    b.add_argument("--quick", action="store_true",
                   help="a few steps per stage on 256 items: checks the recipe end to end")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--install", action="store_true",
                   help="copy the exported folder to the shipped tiny-shapes weights")
    b.add_argument("--reconfigure", action="store_true",
                   help="accept a changed configuration for a run folder (finished stages "
                        "are kept)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_train_base)
